// The editor page: toolbar, palette, canvas and queue, and the keyboard shortcuts.

import { ReactFlowProvider, useReactFlow } from "@xyflow/react";
import { useEffect } from "react";

import { followEvents } from "../api";
import { actions, useEditor } from "../store";
import { Canvas } from "./Canvas";
import { ContextMenu } from "./ContextMenu";
import { ImageViewer } from "./ImageViewer";
import { shortcutFor } from "./keymap";
import { ShortcutSheet } from "./ShortcutSheet";
import { NodeSearch } from "./NodeSearch";
import { Palette } from "./Panels";
import { RunsPanel } from "./RunsPanel";
import { TabBar } from "./TabBar";
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
      const shortcut = shortcutFor(event, typingInField(event.target));
      if (shortcut === undefined) return;
      shortcut.run();
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
      <ShortcutSheet />
      <div className="main">
        <Palette onAdd={addAtCentre} />
        <div className="middle">
          <TabBar />
          <Canvas />
        </div>
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
