// The right-click menus: on the canvas, a node (or the selection it belongs to), a link, a group, a
// note and a reroute point. Closed by choosing, clicking elsewhere or Escape.

import { useReactFlow } from "@xyflow/react";
import { type ReactNode, useEffect } from "react";

import { canvasActions, PALETTE } from "../canvasActions";
import { edgeId, type Graph } from "../graph";
import { actions, type ContextMenu as Menu, useEditor } from "../store";
import { DEFAULT_GROUP_COLOR } from "../uiElements";
import { fitNow, measuredSizes } from "./Canvas";

interface Item {
  label: string;
  run: () => void;
  hint?: string;
  disabled?: boolean;
}

/** A row of colour swatches; `none`: a swatch that takes the colour off. */
function Swatches({ onPick, none, testId }: { onPick: (color: string) => void; none: boolean; testId: string }) {
  return (
    <div className="menu-swatches" data-testid={testId}>
      {none && <button className="swatch none" title="no colour" data-testid={`${testId}-none`}
                       onClick={() => { onPick(""); actions.closeMenu(); }}>∅</button>}
      {PALETTE.map(([name, color]) => (
        <button key={color} className="swatch" title={name} style={{ background: color }} data-testid={`${testId}-${name.replace(" ", "-")}`}
                onClick={() => { onPick(color); actions.closeMenu(); }} />
      ))}
    </div>
  );
}

/** The nodes a menu on node `id` acts on: the selection if the node is in it, else the node alone. */
function nodeTargets(graph: Graph, id: string): string[] {
  const node = graph.nodes.find((n) => n.id === id);
  return node?.selected ? graph.nodes.filter((n) => n.selected).map((n) => n.id) : [id];
}

function menuFor(menu: Menu, graph: Graph, flow: ReturnType<typeof useReactFlow>): { title: string; items: Item[]; colors?: ReactNode } {
  const { target, at } = menu;
  switch (target.kind) {
    case "canvas":
      return { title: "Canvas", items: [
        { label: "Add node…", hint: "double-click", run: () => actions.openSearch({ screen: menu.screen, at }) },
        { label: "Add note", run: () => canvasActions.addNote(at) },
        { label: "Add group", run: () => canvasActions.addGroup([at.x, at.y, 480, 320]) },
        { label: "Group selected nodes", hint: "Ctrl+G", run: () => canvasActions.groupSelection(),
          disabled: !graph.nodes.some((n) => n.selected) },
        { label: "Paste here", hint: "Ctrl+V", run: () => actions.paste(at), disabled: !actions.canPaste() },
        { label: "Select all", hint: "Ctrl+A", run: actions.selectAll },
        { label: "Arrange", run: () => actions.arrange(measuredSizes(flow.getNodes().filter((n) => n.type === "graph"))) },
        { label: "Fit to view", run: () => fitNow(flow) },
      ] };
    case "node": {
      const ids = nodeTargets(graph, target.id);
      const nodes = graph.nodes.filter((n) => ids.includes(n.id));
      const all = (test: (mode?: string) => boolean) => nodes.every((n) => test(n.data.mode));
      const several = ids.length > 1 ? ` (${ids.length} nodes)` : "";
      return { title: `${target.id}${several}`, items: [
        { label: "Rename", run: () => actions.startRenaming(target.id), disabled: ids.length > 1 },
        { label: nodes.every((n) => n.data.collapsed) ? "Expand" : "Collapse", run: () => canvasActions.toggleCollapsed(ids) },
        { label: all((m) => m === "bypass") ? "Stop bypassing" : "Bypass", hint: "Ctrl+B", run: () => actions.toggleMode("bypass", ids) },
        { label: all((m) => m === "mute") ? "Unmute" : "Mute", hint: "Ctrl+M", run: () => actions.toggleMode("mute", ids) },
        { label: "Copy", hint: "Ctrl+C", run: () => actions.copy(ids) },
        { label: "Duplicate", run: () => actions.duplicate(ids) },
        { label: "Group", hint: "Ctrl+G", run: () => {
          actions.selectOnly(ids);
          canvasActions.groupSelection();
        } },
        { label: "Delete", hint: "Del", run: () => actions.deleteNodes(ids) },
      ], colors: <Swatches none testId="menu-color" onPick={(color) => canvasActions.setNodeLook({ color }, ids)} /> };
    }
    case "link": {
      const edge = graph.edges.find((e) => e.id === target.id);
      return { title: "Link", items: [
        { label: "Add reroute point here", hint: "double-click", disabled: !edge, run: () => {
          if (!edge) return;
          const end = (kind: string, node: string, handle: string): [number, number] => {
            const box = document.querySelector(`.react-flow__handle.${kind}[data-nodeid="${CSS.escape(node)}"][data-handleid="${CSS.escape(handle)}"]`)
              ?.getBoundingClientRect();
            const p = box ? flow.screenToFlowPosition({ x: box.left + box.width / 2, y: box.top + box.height / 2 }) : at;
            return [p.x, p.y];
          };
          canvasActions.addReroute(edge.target, edge.targetHandle, [at.x, at.y], end("source", edge.source, edge.sourceHandle),
                                   end("target", edge.target, edge.targetHandle));
        } },
        { label: "Delete link", hint: "Del", run: () => actions.removeLink(target.id) },
      ] };
    }
    case "group": {
      const group = graph.groups.find((g) => g.id === target.id);
      return { title: group?.title || "Group", items: [
        { label: "Rename", run: () => actions.startRenaming(`group:${target.id}`) },
        { label: "Remove group", hint: "Del", run: () => canvasActions.removeGroup(target.id) },
        { label: "Remove group and what is in it", run: () => canvasActions.removeGroup(target.id, true) },
      ], colors: <Swatches none={false} testId="menu-color"
                           onPick={(color) => canvasActions.updateGroup(target.id, { color: color || DEFAULT_GROUP_COLOR })} /> };
    }
    case "note":
      return { title: "Note", items: [
        { label: "Delete note", hint: "Del", run: () => canvasActions.removeNote(target.id) },
      ], colors: <Swatches none testId="menu-color" onPick={(color) => canvasActions.updateNote(target.id, { color })} /> };
    case "reroute": {
      const reroute = graph.reroutes.find((r) => r.id === target.id);
      return { title: "Reroute point", items: [
        { label: "Remove point", hint: "Del", run: () => canvasActions.removeReroute(target.id) },
        { label: "Delete its link", disabled: !reroute,
          run: () => reroute && actions.removeLink(edgeId(reroute.to.node, reroute.to.input)) },
      ] };
    }
  }
}

export function ContextMenu() {
  const menu = useEditor((s) => s.menu);
  const graph = useEditor((s) => s.history.present);
  const flow = useReactFlow();
  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      if (event.key === "Escape") actions.closeMenu();
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, []);
  if (menu === null) return null;
  const { title, items, colors } = menuFor(menu, graph, flow);
  const left = Math.min(menu.screen.x, window.innerWidth - 240);
  const top = Math.min(menu.screen.y, window.innerHeight - 40 - 30 * items.length - (colors ? 40 : 0));
  return (
    <div className="menu-backdrop" onMouseDown={actions.closeMenu}
         onContextMenu={(event) => { event.preventDefault(); actions.closeMenu(); }}>
      <div className="context-menu" role="menu" data-testid={`menu-${menu.target.kind}`} style={{ left, top }}
           onMouseDown={(event) => event.stopPropagation()}>
        <div className="menu-title">{title}</div>
        {items.map((item) => (
          <button key={item.label} role="menuitem" disabled={item.disabled}
                  data-testid={`menu-item-${item.label.toLowerCase().replace(/[^a-z]+/g, "-").replace(/-+$/, "")}`}
                  onClick={() => {
                    actions.closeMenu();
                    item.run();
                  }}>
            <span>{item.label}</span>{item.hint && <span className="menu-hint">{item.hint}</span>}
          </button>
        ))}
        {colors}
      </div>
    </div>
  );
}
