// The toolbar (run, open, save, arrange, undo) and its questions (replace a file, Save As).

import { useReactFlow } from "@xyflow/react";
import { useEffect, useRef, useState } from "react";

import { graphToWorkflow } from "../graph";
import { actions, getState, MAX_BATCH, useEditor, workflowFileName } from "../store";
import { measuredSizes } from "./Canvas";

function downloadJson(name: string, data: unknown): void {
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  URL.revokeObjectURL(url);
}

export function Toolbar() {
  const name = useEditor((s) => s.workflowName);
  const saved = useEditor((s) => s.savedWorkflows);
  const message = useEditor((s) => s.message);
  const batch = useEditor((s) => s.batchCount);
  const minimap = useEditor((s) => s.showMinimap);
  const canUndo = useEditor((s) => s.history.past.length > 0);
  const canRedo = useEditor((s) => s.history.future.length > 0);
  const fileInput = useRef<HTMLInputElement>(null);
  const flow = useReactFlow();
  return (
    <header className="toolbar">
      <strong className="brand">nodegraph</strong>
      <button className="run-button" data-testid="run" onClick={() => void actions.run()} title="queue the graph (Ctrl+Enter)">
        ▶ Run{batch > 1 ? ` ×${batch}` : ""}
      </button>
      <input className="batch-count" type="number" min={1} max={MAX_BATCH} value={batch} data-testid="batch-count"
             title="how many runs Run queues (seeds marked random change between them)"
             onChange={(event) => actions.setBatchCount(Number(event.target.value))} />
      <button onClick={actions.newGraph} data-testid="new" title="clear the canvas for a new workflow (undoable)">New</button>
      <select data-testid="open-saved" value="" onChange={(event) => void actions.openSaved(event.target.value)}>
        <option value="" disabled>Open saved…</option>
        {saved.map((file) => <option key={file} value={file}>{file}</option>)}
      </select>
      <input className="name" value={name} onChange={(event) => actions.rename(event.target.value)}
             data-testid="workflow-name" title="name to save under" />
      <button onClick={() => void actions.saveToServer(name)} data-testid="save"
              title="save in the server's workflows folder (asks before replacing another workflow; Ctrl+S)">Save</button>
      <button onClick={actions.saveAs} data-testid="save-as">Save As…</button>
      <button onClick={() => downloadJson(workflowFileName(name), graphToWorkflow(getState().history.present))}>Download</button>
      <button onClick={() => fileInput.current?.click()}>Open file…</button>
      <input ref={fileInput} type="file" accept=".json,.png,application/json,image/png" hidden data-testid="open-file"
             onChange={(event) => {
               const file = event.target.files?.[0];
               if (file) void actions.openFile(file);
               event.target.value = "";
             }} />
      <button onClick={() => actions.arrange(measuredSizes(flow.getNodes()))} title="lay the graph out in columns">Arrange</button>
      <button onClick={actions.toggleMinimap} data-testid="minimap-toggle" title="show or hide the minimap">
        {minimap ? "Hide map" : "Show map"}
      </button>
      <button onClick={actions.toggleShortcuts} data-testid="shortcuts-button" title="keys and mouse gestures (?)">?</button>
      <button onClick={actions.undo} disabled={!canUndo} title="Ctrl+Z">Undo</button>
      <button onClick={actions.redo} disabled={!canRedo} title="Ctrl+Shift+Z">Redo</button>
      {message && (
        <span className={message.error ? "message error" : "message"} data-testid="message" onClick={actions.dismissMessage}>
          {message.text}
        </span>
      )}
    </header>
  );
}

/** The toolbar's question: replace an existing workflow file, or the name for Save As. */
export function DialogBox() {
  const dialog = useEditor((s) => s.dialog);
  const [name, setName] = useState("");
  useEffect(() => setName(dialog?.name ?? ""), [dialog]);
  if (dialog === null) return null;
  const confirm = () => void actions.confirmDialog(dialog.kind === "saveAs" ? name : undefined);
  return (
    <div className="dialog-backdrop" onClick={actions.closeDialog}>
      <form className="dialog" data-testid="dialog" role="dialog" onClick={(event) => event.stopPropagation()}
            onSubmit={(event) => { event.preventDefault(); confirm(); }}
            onKeyDown={(event) => { if (event.key === "Escape") actions.closeDialog(); }}>
        {dialog.kind === "overwrite"
          ? <p>{dialog.name} already exists on the server. Replace it with this graph?</p>
          : <label>Save as <input autoFocus value={name} data-testid="dialog-name"
                                  onChange={(event) => setName(event.target.value)} /></label>}
        <div className="dialog-buttons">
          <button type="button" onClick={actions.closeDialog} data-testid="dialog-cancel">Cancel</button>
          <button type="submit" className="run-button" data-testid="dialog-confirm" autoFocus={dialog.kind === "overwrite"}>
            {dialog.kind === "overwrite" ? "Replace" : "Save"}
          </button>
        </div>
      </form>
    </div>
  );
}
