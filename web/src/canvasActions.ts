// Changes to what the canvas shows beside the graph's nodes and links: node titles, colours and
// collapsing; groups, notes and reroute points. Each is one undo step.

import { nodeBox } from "./canvasElements";
import { edgeId, type Graph, type GraphNodeData } from "./graph";
import { editing } from "./graphActions";
import {
  addReroute, boundsAround, COLOR, DEFAULT_GROUP_COLOR, DEFAULT_NOTE_SIZE, type Group, newElementId, type Note, type Point,
} from "./uiElements";

/** Colours offered for nodes, groups and notes (title bars and frames): name -> "#rrggbb". */
export const PALETTE: [string, string][] = [
  ["red", "#8c3a3a"], ["brown", "#6e4b2c"], ["green", "#3c6b3c"], ["blue", "#355a8c"], ["pale blue", "#3f789e"],
  ["cyan", "#2e6e6e"], ["purple", "#5e4086"], ["yellow", "#807028"], ["black", "#222226"],
];

type Look = Pick<GraphNodeData, "title" | "color" | "collapsed">;

function withNodes(graph: Graph, ids: Set<string>, change: (data: GraphNodeData) => GraphNodeData): Graph {
  return { ...graph, nodes: graph.nodes.map((node) => ids.has(node.id) ? { ...node, data: change(node.data) } : node) };
}

/** The data with each field of `look` set, or removed where it is empty (undefined, "", false). */
function withLook(data: GraphNodeData, look: Look): GraphNodeData {
  const next: GraphNodeData = { ...data };
  for (const [key, value] of Object.entries(look) as [keyof Look, unknown][]) {
    if (value === undefined || value === "" || value === false) delete next[key];
    else (next as Record<string, unknown>)[key] = value;
  }
  return next;
}

const everyElement = (graph: Graph) => [...graph.groups, ...graph.notes, ...graph.reroutes].map((e) => e.id);

export const canvasActions = {
  /** Rename (a blank title shows the type's name again), colour or collapse nodes: `ids`, else the selection. */
  setNodeLook(look: Look, ids?: string[]): void {
    if (look.color !== undefined && look.color !== "" && !COLOR.test(look.color)) return;
    const chosen = new Set(ids ?? editing.selected().nodes);
    const trimmed = look.title === undefined ? look : { ...look, title: look.title.trim() };
    if (chosen.size > 0) editing.commit(withNodes(editing.graph(), chosen, (data) => withLook(data, trimmed)));
  },

  /** Collapse the nodes (or expand them, if all are collapsed). */
  toggleCollapsed(ids?: string[]): void {
    const chosen = new Set(ids ?? editing.selected().nodes);
    const nodes = editing.graph().nodes.filter((node) => chosen.has(node.id));
    if (nodes.length === 0) return;
    const collapse = !nodes.every((node) => node.data.collapsed);
    editing.commit(withNodes(editing.graph(), chosen, (data) => withLook(data, { collapsed: collapse })));
  },

  /** A group around the selected nodes and notes (Ctrl+G); with nothing selected, says so. */
  groupSelection(): string | null {
    const graph = editing.graph();
    const boxes = [...graph.nodes.filter((n) => n.selected).map(nodeBox),
                   ...graph.notes.filter((n) => n.selected).map((n) => ({ x: n.pos[0], y: n.pos[1], width: n.size[0], height: n.size[1] }))];
    if (boxes.length === 0) {
      editing.say("select the nodes to group first", true);
      return null;
    }
    return canvasActions.addGroup(boundsAround(boxes));
  },

  /** A new group with these bounds (the title is typed over it at once). */
  addGroup(bounds: Group["bounds"], title = "Group"): string {
    const graph = editing.graph();
    const id = newElementId("group", everyElement(graph));
    editing.commit({ ...graph, groups: [...graph.groups, { id, title, color: DEFAULT_GROUP_COLOR, bounds }] });
    return id;
  },

  updateGroup(id: string, change: Partial<Pick<Group, "title" | "color">>): void {
    if (change.color !== undefined && !COLOR.test(change.color)) return;
    const graph = editing.graph();
    editing.commit({ ...graph, groups: graph.groups.map((g) => g.id === id ? { ...g, ...change } : g) });
  },

  /** Remove a group; `withContents`: the nodes, notes and reroutes inside it too. */
  removeGroup(id: string, withContents = false): void {
    const graph = editing.graph();
    const group = graph.groups.find((g) => g.id === id);
    if (!group) return;
    let next: Graph = { ...graph, groups: graph.groups.filter((g) => g.id !== id) };
    if (withContents) {
      const [x, y, w, h] = group.bounds;
      const inside = (px: number, py: number) => px >= x && px <= x + w && py >= y && py <= y + h;
      const nodes = new Set(graph.nodes.filter((n) => {
        const box = nodeBox(n);
        return inside(box.x + box.width / 2, box.y + box.height / 2);
      }).map((n) => n.id));
      next = {
        ...next, nodes: next.nodes.filter((n) => !nodes.has(n.id)),
        edges: next.edges.filter((e) => !nodes.has(e.source) && !nodes.has(e.target)),
        notes: next.notes.filter((n) => !inside(n.pos[0] + n.size[0] / 2, n.pos[1] + n.size[1] / 2)),
      };
      const links = new Set(next.edges.map((e) => e.id));
      next.reroutes = next.reroutes.filter((r) => !inside(...r.pos) && links.has(edgeId(r.to.node, r.to.input)));
    }
    editing.commit(next);
  },

  removeNote(id: string): void {
    const graph = editing.graph();
    editing.commit({ ...graph, notes: graph.notes.filter((n) => n.id !== id) });
  },

  removeReroute(id: string): void {
    const graph = editing.graph();
    editing.commit({ ...graph, reroutes: graph.reroutes.filter((r) => r.id !== id) });
  },

  /** A new, empty note at a point; it opens for typing. */
  addNote(at: { x: number; y: number }, text = ""): string {
    const graph = editing.graph();
    const id = newElementId("note", everyElement(graph));
    const note: Note = { id, text, pos: [at.x, at.y], size: [...DEFAULT_NOTE_SIZE] };
    editing.commit({ ...graph, notes: [...graph.notes, note] });
    return id;
  },

  updateNote(id: string, change: Partial<Pick<Note, "text" | "color">>): void {
    if (change.color !== undefined && change.color !== "" && !COLOR.test(change.color)) return;
    const graph = editing.graph();
    editing.commit({ ...graph, notes: graph.notes.map((n) => {
      if (n.id !== id) return n;
      const next = { ...n, ...change };
      if (next.color === "") delete next.color;
      return next;
    }) });
  },

  /** A reroute point at `at` on the link into `target`.`input`, placed in order along it (`from`, `to`:
   *  the link's ends on the canvas). */
  addReroute(target: string, input: string, at: Point, from: Point, to: Point): string | null {
    const graph = editing.graph();
    if (!graph.edges.some((e) => e.target === target && e.targetHandle === input)) return null;
    const id = newElementId("reroute", everyElement(graph));
    editing.commit({ ...graph, reroutes: addReroute(graph.reroutes, { id, pos: at, to: { node: target, input } }, from, to) });
    return id;
  },
};
