// The open tabs kept in local storage: written whenever a graph, a name or the tabs change, and read
// back when the page is (re)loaded.

import { type EditorState, getState, set, subscribe } from "./editorState";
import { withDefaults, workflowToGraph } from "./graph";
import { startHistory } from "./history";
import { say } from "./messages";
import { currentTabs, liveTab, opened } from "./tabActions";
import { readStoredTabs, type StoredTab, storedTab, type Tab, TABS_KEY } from "./tabs";

export const SAVED_GRAPH_KEY = "nodegraph.graph";

function persist(): void {
  try {
    const active = storedTab(liveTab());
    localStorage.setItem(SAVED_GRAPH_KEY, JSON.stringify(active));
    localStorage.setItem(TABS_KEY, JSON.stringify({ active: getState().graphId, tabs: currentTabs().map(storedTab) }));
  } catch {
    // Storage full or disabled: the graphs still live in the page; nothing else depends on them.
  }
}

/** Store the tabs after every change of what they keep (not after a selection alone, a message, a run event...). */
export function keepTabsStored(): void {
  let before: EditorState = getState();
  subscribe(() => {
    const state = getState();
    if (state.history.present !== before.history.present || state.workflowName !== before.workflowName
        || state.savedAs !== before.savedAs || state.graphId !== before.graphId || state.tabs !== before.tabs) persist();
    before = state;
  });
}

/** The tabs open before the page was (re)loaded, from local storage: each graph with a new undo
 *  history, the same graph id (its runs are still its own). False if there are none. */
export function restoreTabs(): boolean {
  let stored: { active: string; tabs: StoredTab[] } | null = null;
  try {
    stored = readStoredTabs(localStorage.getItem(TABS_KEY));
    if (stored === null) {
      // Stored by an editor without tabs: its one graph.
      const single = localStorage.getItem(SAVED_GRAPH_KEY);
      const one = single === null ? null : JSON.parse(single) as StoredTab;
      if (one !== null && typeof one.graphId === "string") stored = { active: one.graphId, tabs: [one] };
    }
  } catch {
    stored = null;  // unreadable: start from the default workflow instead
  }
  if (stored === null) return false;
  const tabs: Tab[] = [];
  const catalogue = getState().catalogue;
  for (const saved of stored.tabs) {
    try {
      const read = workflowToGraph(saved.workflow);
      const graph = catalogue === null ? read : withDefaults(read, catalogue);
      tabs.push({ graphId: saved.graphId, workflowName: saved.name, savedAs: typeof saved.savedAs === "string" ? saved.savedAs : null,
                  history: startHistory(graph), editedBefore: saved.edited === true });
    } catch (error) {
      say(`a tab could not be reopened (${saved.name}): ${(error as Error).message}`, true);
    }
  }
  if (tabs.length === 0) return false;
  const active = Math.max(0, tabs.findIndex((tab) => tab.graphId === stored.active));
  set({ tabs, activeTab: active, ...opened(tabs[active]), loads: getState().loads + 1 });
  return true;
}
