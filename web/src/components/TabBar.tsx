// The workflow tabs above the canvas: one per open graph (its name, • once edited, ● while a run it
// submitted is queued or running), + for a new one, × to close one.

import { actions, graphBusy, useEditor } from "../store";
import { edited, type Tab } from "../tabs";

export function TabBar() {
  const tabs = useEditor((s) => s.tabs);
  const active = useEditor((s) => s.activeTab);
  const name = useEditor((s) => s.workflowName);
  const history = useEditor((s) => s.history);
  const graphId = useEditor((s) => s.graphId);
  const savedAs = useEditor((s) => s.savedAs);
  const editedBefore = useEditor((s) => s.editedBefore);
  // The open tab as it is now (the list holds it as it was when last stored).
  const live: Tab = { graphId, workflowName: name, savedAs, history, editedBefore };
  const shown = tabs.length === 0 ? [live] : tabs.map((tab, i) => i === active ? live : tab);
  const busy = useEditor((s) => shown.map((tab) => graphBusy(s, tab.graphId)).join(","));
  const running = busy.split(",");
  return (
    <div className="tab-bar" data-testid="tabs" role="tablist">
      {shown.map((tab, index) => {
        const open = index === active;
        return (
          <div key={tab.graphId} role="tab" aria-selected={open} className={open ? "tab active" : "tab"}
               data-testid={`tab-${index}`} title={tab.workflowName}
               onMouseDown={(event) => { if (event.button === 1) actions.closeTab(index); }}
               onClick={() => actions.switchTab(index)}>
            {running[index] === "true" && <span className="tab-running" data-testid={`tab-running-${index}`} title="a run of this graph is queued or running">●</span>}
            <span className="tab-name">{tab.workflowName}</span>
            {edited(tab) && <span className="tab-edited" title="edited since it was opened">•</span>}
            <button className="tab-close" data-testid={`tab-close-${index}`} title="close this tab"
                    onClick={(event) => { event.stopPropagation(); actions.closeTab(index); }}>×</button>
          </div>
        );
      })}
      <button className="tab-new" data-testid="tab-new" title="a new, empty tab" onClick={actions.newTab}>+</button>
    </div>
  );
}
