// The editor page: toolbar, palette, canvas and queue, and the keyboard shortcuts.

import { ReactFlowProvider, useReactFlow } from "@xyflow/react";
import { useEffect, useRef } from "react";

import { followEvents } from "../api";
import { actions, getState, useEditor } from "../store";
import { Canvas } from "./Canvas";
import { ContextMenu } from "./ContextMenu";
import { ImageViewer } from "./ImageViewer";
import { shortcutFor } from "../keymap";
import { ShortcutSheet } from "./ShortcutSheet";
import { NodeSearch } from "./NodeSearch";
import { Palette } from "./Panels";
import { RunsPanel } from "./RunsPanel";
import { TabBar } from "./TabBar";
import { DialogBox, Toolbar } from "./Toolbar";

/** A letter or digit typed with no modifier while nothing else (search, menu, dialog, viewer) is open. */
function startsSearch(event: KeyboardEvent): boolean {
  const { search, menu, dialog, viewer, showShortcuts } = getState();
  return /^[a-zA-Z0-9]$/.test(event.key) && !event.ctrlKey && !event.metaKey && !event.altKey
    && search === null && menu === null && dialog === null && viewer === null && !showShortcuts;
}

function canvasCentre(): { x: number; y: number } {
  const box = document.querySelector(".canvas")?.getBoundingClientRect();
  return box ? { x: box.left + box.width / 2, y: box.top + box.height / 2 } : { x: 400, y: 300 };
}

function typingInField(target: EventTarget | null): boolean {
  return target instanceof HTMLElement && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

function Editor() {
  const flow = useReactFlow();
  /** Where the pointer last was over the canvas: a search started by typing opens there. */
  const pointer = useRef<{ x: number; y: number } | null>(null);
  useEffect(() => {
    const onMove = (event: MouseEvent) => {
      const overCanvas = (event.target as Element | null)?.closest?.(".canvas") !== null;
      pointer.current = overCanvas ? { x: event.clientX, y: event.clientY } : null;
    };
    window.addEventListener("mousemove", onMove);
    return () => window.removeEventListener("mousemove", onMove);
  }, []);
  useEffect(() => {
    void actions.start();
    return followEvents(actions.event, actions.setConnected);
  }, []);
  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      const typing = typingInField(event.target);
      const shortcut = shortcutFor(event, typing);
      if (shortcut !== undefined) {
        shortcut.run();
        event.preventDefault();
      } else if (!typing && startsSearch(event)) {
        // Typing a letter on the canvas starts a node search with it, where the pointer is.
        event.preventDefault();
        const screen = pointer.current ?? canvasCentre();
        actions.openSearch({ screen, at: flow.screenToFlowPosition(screen), query: event.key });
      }
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, []);
  const addAtCentre = (type: string) => actions.addNode(type, flow.screenToFlowPosition(canvasCentre()));
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
