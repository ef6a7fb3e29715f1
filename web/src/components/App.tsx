// The editor page: toolbar, palette, canvas and queue; keyboard shortcuts and file drops.

import {
  Background, Controls, type FinalConnectionState, MiniMap, ReactFlow, ReactFlowProvider, useReactFlow,
  type Connection as FlowConnection, type IsValidConnection,
} from "@xyflow/react";
import { type DragEvent, useEffect, useRef, useState } from "react";

import { followEvents } from "../api";
import { graphToWorkflow, type GraphEdge, type Size } from "../graph";
import { actions, getState, useEditor, workflowFileName } from "../store";
import { GraphNode } from "./GraphNode";
import { Palette, PALETTE_DRAG_TYPE, QueuePanel } from "./Panels";

const nodeTypes = { graph: GraphNode };

function asConnection(connection: FlowConnection | GraphEdge) {
  return { source: connection.source, sourceHandle: connection.sourceHandle ?? "",
           target: connection.target, targetHandle: connection.targetHandle ?? "" };
}

/** The link a drag that ended on a socket asked for, whichever end it started from. */
function droppedConnection(state: FinalConnectionState) {
  const from = state.fromHandle;
  const to = state.toHandle;
  if (from === null || to === null) return null;
  const [source, target] = from.type === "source" ? [from, to] : [to, from];
  return { source: source.nodeId, sourceHandle: source.id ?? "", target: target.nodeId, targetHandle: target.id ?? "",
           sameKind: from.type === to.type };
}

function typingInField(target: EventTarget | null): boolean {
  return target instanceof HTMLElement && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

function downloadJson(name: string, data: unknown): void {
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  URL.revokeObjectURL(url);
}

function Toolbar() {
  const name = useEditor((s) => s.workflowName);
  const saved = useEditor((s) => s.savedWorkflows);
  const message = useEditor((s) => s.message);
  const canUndo = useEditor((s) => s.history.past.length > 0);
  const canRedo = useEditor((s) => s.history.future.length > 0);
  const fileInput = useRef<HTMLInputElement>(null);
  const flow = useReactFlow();
  return (
    <header className="toolbar">
      <strong className="brand">nodegraph</strong>
      <button className="run-button" data-testid="run" onClick={() => void actions.run()}>▶ Run</button>
      <button onClick={actions.newGraph} data-testid="new" title="clear the canvas for a new workflow (undoable)">New</button>
      <select data-testid="open-saved" value="" onChange={(event) => void actions.openSaved(event.target.value)}>
        <option value="" disabled>Open saved…</option>
        {saved.map((file) => <option key={file} value={file}>{file}</option>)}
      </select>
      <input className="name" value={name} onChange={(event) => actions.rename(event.target.value)}
             data-testid="workflow-name" title="name to save under" />
      <button onClick={() => void actions.saveToServer(name)} data-testid="save"
              title="save in the server's workflows folder (asks before replacing another workflow)">Save</button>
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
function DialogBox() {
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

function measuredSizes(nodes: { id: string; measured?: { width?: number; height?: number } }[]): Map<string, Size> {
  return new Map(nodes.map((node) => [node.id, { width: node.measured?.width ?? 240, height: node.measured?.height ?? 120 }]));
}

function Canvas() {
  const nodes = useEditor((s) => s.history.present.nodes);
  const edges = useEditor((s) => s.history.present.edges);
  const catalogue = useEditor((s) => s.catalogue);
  const loads = useEditor((s) => s.loads);
  const flow = useReactFlow();
  useEffect(() => {
    // Bring a newly loaded workflow into view once React Flow has measured all of its nodes.
    let frames = 0;
    let handle = 0;
    const fitWhenMeasured = () => {
      const wanted = new Set(getState().history.present.nodes.map((node) => node.id));
      const shown = flow.getNodes().filter((node) => wanted.has(node.id) && node.measured?.width);
      if (wanted.size > 0 && shown.length === wanted.size) {
        actions.arrange(measuredSizes(shown), true);
        handle = requestAnimationFrame(() => void flow.fitView({ padding: 0.1 }));
      } else if (frames++ < 300) {
        handle = requestAnimationFrame(fitWhenMeasured);
      }
    };
    handle = requestAnimationFrame(fitWhenMeasured);
    return () => cancelAnimationFrame(handle);
  }, [loads, flow]);

  const isValidConnection: IsValidConnection = (connection) => actions.canConnect(asConnection(connection as FlowConnection));
  const styledEdges = edges.map((edge) => {
    const source = nodes.find((node) => node.id === edge.source);
    const type = source && catalogue?.nodes[source.data.nodeType]?.outputs[edge.sourceHandle]?.type;
    const color = type ? catalogue?.types[type]?.color : undefined;
    return color ? { ...edge, style: { stroke: color, strokeWidth: 2 } } : edge;
  });

  const onDrop = (event: DragEvent) => {
    event.preventDefault();
    const type = event.dataTransfer.getData(PALETTE_DRAG_TYPE);
    if (type) {
      actions.addNode(type, flow.screenToFlowPosition({ x: event.clientX, y: event.clientY }));
      return;
    }
    const file = event.dataTransfer.files[0];
    if (file) void actions.openFile(file);
  };

  return (
    <div className="canvas" onDrop={onDrop} onDragOver={(event) => event.preventDefault()} data-testid="canvas">
      <ReactFlow nodes={nodes} edges={styledEdges} nodeTypes={nodeTypes}
                 onNodesChange={actions.nodesChanged} onEdgesChange={actions.edgesChanged}
                 onConnect={(connection) => actions.connect(asConnection(connection))}
                 onConnectEnd={(_, state) => {
                   // React Flow drops a refused link without a word: say why it was refused.
                   const dropped = state.isValid === false ? droppedConnection(state) : null;
                   if (dropped !== null) actions.explainRefusedLink(dropped, dropped.sameKind);
                 }}
                 isValidConnection={isValidConnection} deleteKeyCode={["Delete", "Backspace"]}
                 multiSelectionKeyCode={["Shift", "Meta", "Control"]} fitView minZoom={0.1}>
        <Background />
        <Controls />
        <MiniMap pannable zoomable bgColor="#1e1f24" maskColor="#0009" nodeColor="#4a4e5a" />
      </ReactFlow>
    </div>
  );
}

function Editor() {
  const flow = useReactFlow();
  useEffect(() => {
    void actions.start();
    return followEvents(actions.event, actions.setConnected);
  }, []);
  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      if (typingInField(event.target)) return;
      const mod = event.ctrlKey || event.metaKey;
      const key = event.key.toLowerCase();
      if (mod && key === "z" && !event.shiftKey) actions.undo();
      else if (mod && (key === "y" || (key === "z" && event.shiftKey))) actions.redo();
      else if (mod && key === "c") actions.copy();
      else if (mod && key === "v") actions.paste();
      else if (mod && key === "enter") void actions.run();
      else return;
      event.preventDefault();
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, []);
  const addAtCentre = (type: string) => {
    const box = document.querySelector(".canvas")?.getBoundingClientRect();
    const centre = box ? { x: box.left + box.width / 2, y: box.top + box.height / 2 } : { x: 400, y: 300 };
    actions.addNode(type, flow.screenToFlowPosition(centre));
  };
  const ready = useEditor((s) => s.ready);
  const loads = useEditor((s) => s.loads);
  return (
    <div className="editor" data-ready={ready} data-loads={loads}>
      <Toolbar />
      <DialogBox />
      <div className="main">
        <Palette onAdd={addAtCentre} />
        <Canvas />
        <QueuePanel />
      </div>
    </div>
  );
}

export function App() {
  return (
    <ReactFlowProvider>
      <Editor />
    </ReactFlowProvider>
  );
}
