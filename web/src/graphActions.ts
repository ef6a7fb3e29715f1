// Undoable edits of the graph on the canvas: nodes, links and values, the selection and the clipboard,
// undo and redo. Typing into one field, or one drag or resize, is one undo step.

import { applyEdgeChanges, applyNodeChanges, type EdgeChange, type NodeChange } from "@xyflow/react";

import { randomSeed, widgetFor } from "./catalogue";
import { applyElementChanges, elementOf } from "./canvasElements";
import { type DraggedLink, currentGraph as graph, getState, set } from "./editorState";
import {
  arrange, connect, type Connection, connectionProblem, copySelection, createNode, freeSpot, type Graph, type GraphEdge,
  type GraphNode, hasOverlaps, newNodeId, type NodeMode, paste, pruneReroutes, removeItems, type Size, type Snippet,
  toggleMode,
} from "./graph";
import { record, redo, replace, undo } from "./history";
import { say } from "./messages";

/** The drawn width of a node (styles.css .graph-node). */
export const NODE_WIDTH = 240;

/** A drag or resize under way: its moves after the first join the undo step its start recorded. */
let gesture = false;
/** The input being typed into ("node\u0000input"): its further changes join the same undo step. */
let typing: string | null = null;
let clipboard: Snippet | null = null;

/** Another graph comes onto the canvas: a field being typed into or a drag under way ends with the old one. */
export function endOngoingEdits(): void {
  typing = null;
  gesture = false;
}

/** Make `next` the graph on the canvas, as one undo step. */
export function commit(next: Graph): void {
  typing = null;
  set({ history: record(getState().history, next), issues: {} });
}

function selectedIds(): { nodes: Set<string>; edges: Set<string> } {
  return { nodes: new Set(graph().nodes.filter((n) => n.selected).map((n) => n.id)),
           edges: new Set(graph().edges.filter((e) => e.selected).map((e) => e.id)) };
}

/** The graph with a new node of `type` at `position` (or beside a node already there), selected alone. */
export function withNewNode(base: Graph, type: string, position: { x: number; y: number }): { graph: Graph; id: string } | null {
  const spec = getState().catalogue?.nodes[type];
  if (spec === undefined) return null;
  const id = newNodeId(type, new Set(base.nodes.map((n) => n.id)));
  const node = { ...createNode(spec, id, freeSpot(base, position)), selected: true };
  return { id, graph: { ...base, nodes: [...base.nodes.map((n) => ({ ...n, selected: false })), node] } };
}

/** For the action modules beside the store (canvasActions.ts): the graph on the canvas, an undoable
 *  change to it, the toolbar message and the selection. */
export const editing = {
  graph: (): Graph => graph(),
  commit: (next: Graph): void => commit(next),
  say: (text: string, error = false): void => say(text, error),
  selected: selectedIds,
};

export const graphActions = {
  nodesChanged(changes: NodeChange[]): void {
    const isElement = (change: NodeChange) => "id" in change && elementOf(change.id, graph()) !== null;
    const elementChanges = changes.filter(isElement);
    const nodeChanges = changes.filter((change) => !isElement(change));
    const moved = new Set(changes.flatMap((c) => c.type === "position" ? [c.id] : []));
    let next = elementChanges.length > 0 ? applyElementChanges(graph(), elementChanges, moved) : graph();
    if (nodeChanges.length > 0) next = { ...next, nodes: applyNodeChanges(nodeChanges as NodeChange<GraphNode>[], next.nodes) };
    // A drag or resize is one undo step, recorded when it starts (the state before it is the one to go
    // back to); a removal is one; selection changes are none.
    const starts = changes.some((c) => (c.type === "position" && c.dragging === true) || (c.type === "dimensions" && c.resizing === true));
    const ends = changes.some((c) => (c.type === "position" && c.dragging === false) || (c.type === "dimensions" && c.resizing === false));
    let undoable = changes.some((c) => c.type === "remove");
    if (starts && !gesture) {
      gesture = true;
      undoable = true;
    }
    if (ends) {
      if (!gesture) undoable = true;  // a move reported only as finished
      gesture = false;
    }
    if (nodeChanges.some((c) => c.type === "remove")) {
      const removed = new Set(nodeChanges.filter((c) => c.type === "remove").map((c) => (c as { id: string }).id));
      next = pruneReroutes({ ...next, edges: next.edges.filter((e) => !removed.has(e.source) && !removed.has(e.target)) });
    }
    if (undoable) typing = null;
    set({ history: undoable ? record(getState().history, next) : replace(getState().history, next) });
  },

  edgesChanged(changes: EdgeChange<GraphEdge>[]): void {
    const next = pruneReroutes({ ...graph(), edges: applyEdgeChanges(changes, graph().edges) as GraphEdge[] });
    const undoable = changes.some((c) => c.type === "remove");
    if (undoable) typing = null;
    set({ history: undoable ? record(getState().history, next) : replace(getState().history, next) });
  },

  canConnect(connection: Connection): boolean {
    const catalogue = getState().catalogue;
    return catalogue !== null && connectionProblem(catalogue, graph(), connection) === null;
  },

  connect(connection: Connection): void {
    const catalogue = getState().catalogue;
    if (catalogue === null) return;
    const problem = connectionProblem(catalogue, graph(), connection);
    if (problem !== null) {
      say(`cannot connect: ${problem}`, true);
      return;
    }
    commit(connect(graph(), connection));
  },

  /** Move a link pulled off its input to another input: one undo step. */
  moveLink(edge: GraphEdge, connection: Connection): void {
    const catalogue = getState().catalogue;
    if (catalogue === null) return;
    const without = removeItems(graph(), new Set(), new Set([edge.id]));
    const problem = connectionProblem(catalogue, without, connection);
    if (problem !== null) {
      say(`cannot connect: ${problem}`, true);
      commit(without);
      return;
    }
    commit(connect(without, connection));
  },

  removeLink(edgeId: string): void {
    commit(removeItems(graph(), new Set(), new Set([edgeId])));
  },

  /** A dragged link let go on a node (not on a socket): joined to the first socket there that fits,
   *  a free one before a linked one. False if none fits (nothing changes). */
  linkToNode(link: DraggedLink, nodeId: string): boolean {
    const catalogue = getState().catalogue;
    const node = graph().nodes.find((n) => n.id === nodeId);
    const spec = node && catalogue?.nodes[node.data.nodeType];
    if (!catalogue || !spec || nodeId === link.nodeId) return false;
    let base = graph();
    if (link.replaces !== undefined) base = removeItems(base, new Set(), new Set([link.replaces]));
    const linked = new Set(base.edges.filter((e) => e.target === nodeId).map((e) => e.targetHandle));
    const candidates = link.from === "output"
      ? Object.keys(spec.inputs).sort((a, b) => Number(linked.has(a)) - Number(linked.has(b)))
        .map((input) => ({ source: link.nodeId, sourceHandle: link.socket, target: nodeId, targetHandle: input }))
      : Object.keys(spec.outputs).map((output) => ({ source: nodeId, sourceHandle: output, target: link.nodeId, targetHandle: link.socket }));
    const fitting = candidates.find((connection) => connectionProblem(catalogue, base, connection) === null);
    if (fitting === undefined) return false;
    commit(connect(base, fitting));
    return true;
  },

  /** Say why a link dropped on a socket was not made (`sameKind`: output on output, input on input). */
  explainRefusedLink(connection: Connection, sameKind = false): void {
    const catalogue = getState().catalogue;
    if (catalogue === null) return;
    const problem = sameKind ? "a link goes from an output to an input"
      : connectionProblem(catalogue, graph(), connection);
    if (problem !== null) say(`cannot connect: ${problem}`, true);
  },

  /** Add a node of `type` at `position`, or beside it if a node sits there already; it is selected. */
  addNode(type: string, position: { x: number; y: number }): string | null {
    const added = withNewNode(graph(), type, position);
    if (added === null) return null;
    commit(added.graph);
    return added.id;
  },

  /** Set a literal input. Changes to the same input one after another are one undo step (a prompt
   *  typed letter by letter), until `finishTyping` (the field is left) or any other edit. */
  setValue(nodeId: string, input: string, value: unknown): void {
    const next = { ...graph(), nodes: graph().nodes.map((node) => node.id !== nodeId ? node
      : { ...node, data: { ...node.data, values: { ...node.data.values, [input]: value } } }) };
    const key = `${nodeId}\u0000${input}`;
    if (typing === key) {
      set({ history: replace(getState().history, next), issues: {} });
    } else {
      commit(next);
      typing = key;
    }
  },

  finishTyping(): void {
    typing = null;
  },

  setRandomize(nodeId: string, input: string, on: boolean): void {
    commit({ ...graph(), nodes: graph().nodes.map((node) => {
      if (node.id !== nodeId) return node;
      const others = (node.data.randomize ?? []).filter((name) => name !== input);
      return { ...node, data: { ...node.data, randomize: on ? [...others, input] : others } };
    }) });
  },

  /** Lay the graph out in columns; `ifOverlapping` only when nodes overlap, without an undo step
   *  (a loaded workflow whose saved positions are too tight for the drawn nodes). */
  arrange(sizes: Map<string, Size>, ifOverlapping = false): void {
    if (ifOverlapping) {
      if (hasOverlaps(graph(), sizes)) set({ history: replace(getState().history, arrange(graph(), sizes)) });
      return;
    }
    commit(arrange(graph(), sizes));
  },

  /** Bypass (or mute) the selected nodes; if all of them already are, run them again (Ctrl+B, Ctrl+M). */
  toggleMode(mode: NodeMode, ids?: string[]): void {
    const nodes = ids ? new Set(ids) : selectedIds().nodes;
    if (nodes.size === 0) {
      say(`select the nodes to ${mode} first`, true);
      return;
    }
    commit(toggleMode(graph(), nodes, mode));
  },

  deleteSelected(): void {
    const { nodes, edges } = selectedIds();
    if (nodes.size + edges.size > 0) commit(removeItems(graph(), nodes, edges));
  },

  /** Copy the nodes `ids` (else the selection) and the links among them. */
  copy(ids?: string[]): void {
    const nodes = ids ? new Set(ids) : selectedIds().nodes;
    if (nodes.size > 0) clipboard = copySelection(graph(), nodes);
  },

  /** Paste the copied nodes, 40 to the right and down of where they were (or with their top-left at `at`). */
  paste(at?: { x: number; y: number }): void {
    if (clipboard === null || clipboard.nodes.length === 0) return;
    const left = Math.min(...clipboard.nodes.map((n) => n.position.x));
    const top = Math.min(...clipboard.nodes.map((n) => n.position.y));
    commit(paste(graph(), clipboard, at ? { x: at.x - left, y: at.y - top } : { x: 40, y: 40 }));
  },

  canPaste(): boolean {
    return clipboard !== null && clipboard.nodes.length > 0;
  },

  /** Copies of the nodes `ids` beside them, selected (the clipboard is left as it was). */
  duplicate(ids: string[]): void {
    if (ids.length > 0) commit(paste(graph(), copySelection(graph(), new Set(ids)), { x: 40, y: 40 }));
  },

  deleteNodes(ids: string[]): void {
    if (ids.length > 0) commit(removeItems(graph(), new Set(ids), new Set()));
  },

  /** Select the nodes `ids` and nothing else. */
  selectOnly(ids: string[]): void {
    const g = graph();
    const chosen = new Set(ids);
    set({ history: replace(getState().history, {
      ...g, nodes: g.nodes.map((n) => ({ ...n, selected: chosen.has(n.id) })), edges: g.edges.map((e) => ({ ...e, selected: false })),
      groups: g.groups.map((x) => ({ ...x, selected: false })), notes: g.notes.map((x) => ({ ...x, selected: false })),
      reroutes: g.reroutes.map((x) => ({ ...x, selected: false })),
    }) });
  },

  /** Select every node, group, note and reroute point (Ctrl+A). */
  selectAll(): void {
    const g = graph();
    set({ history: replace(getState().history, {
      ...g, nodes: g.nodes.map((n) => ({ ...n, selected: true })), groups: g.groups.map((x) => ({ ...x, selected: true })),
      notes: g.notes.map((x) => ({ ...x, selected: true })), reroutes: g.reroutes.map((x) => ({ ...x, selected: true })),
    }) });
  },

  undo(): void {
    typing = null;
    set({ history: undo(getState().history) });
  },

  redo(): void {
    typing = null;
    set({ history: redo(getState().history) });
  },

  randomizeSeeds(): void {
    const catalogue = getState().catalogue;
    if (catalogue === null) return;
    let changed = false;
    const nodes = graph().nodes.map((node) => {
      const spec = catalogue.nodes[node.data.nodeType];
      if (!spec || !node.data.randomize?.length) return node;
      const values = { ...node.data.values };
      for (const input of node.data.randomize) {
        const widget = spec.inputs[input] && widgetFor(input, spec.inputs[input]);
        if (widget?.kind === "seed") {
          values[input] = randomSeed(widget);
          changed = true;
        }
      }
      return { ...node, data: { ...node.data, values } };
    });
    if (changed) commit({ ...graph(), nodes });
  },
};
