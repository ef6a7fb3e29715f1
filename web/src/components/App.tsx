// The editor page: toolbar, palette, canvas and queue, and the keyboard shortcuts.

import { ReactFlowProvider, useReactFlow } from "@xyflow/react";
import { useEffect } from "react";

import { followEvents } from "../api";
import { canvasActions } from "../canvasActions";
import { actions, useEditor } from "../store";
import { Canvas } from "./Canvas";
import { ContextMenu } from "./ContextMenu";
import { ImageViewer } from "./ImageViewer";
import { NodeSearch } from "./NodeSearch";
import { Palette } from "./Panels";
import { RunsPanel } from "./RunsPanel";
import { DialogBox, Toolbar } from "./Toolbar";

function typingInField(target: EventTarget | null): boolean {
  return target instanceof HTMLElement && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
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
      else if (mod && key === "b") actions.toggleMode("bypass");
      else if (mod && key === "m") actions.toggleMode("mute");
      else if (mod && key === "g") canvasActions.groupSelection();
      else if (mod && key === "a") actions.selectAll();
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
      <NodeSearch />
      <ContextMenu />
      <ImageViewer />
      <div className="main">
        <Palette onAdd={addAtCentre} />
        <Canvas />
        <RunsPanel />
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
