// Groups, notes and reroute points as React Flow nodes ("group:<id>", "note:<id>", "reroute:<id>"),
// and React Flow's changes to them (moves, resizes, selection, removal) applied back to the graph.
// Moving a group moves what lies inside it when the drag starts.

import type { NodeChange } from "@xyflow/react";

import type { Graph, GraphNode } from "./graph";
import { type Box, type Group, insideGroup, type Note, type Reroute } from "./uiElements";

export const REROUTE_RADIUS = 7;
/** A node's size before React Flow has measured it. */
const UNMEASURED = { width: 240, height: 120 };

export type ElementKind = "group" | "note" | "reroute";

/** The kind and id of a React Flow node that stands for a group, note or reroute; null for a graph node. */
export function elementOf(flowId: string, graph: Graph): { kind: ElementKind; id: string } | null {
  const colon = flowId.indexOf(":");
  if (colon < 0) return null;
  const kind = flowId.slice(0, colon);
  const id = flowId.slice(colon + 1);
  if (kind === "group" && graph.groups.some((g) => g.id === id)) return { kind, id };
  if (kind === "note" && graph.notes.some((n) => n.id === id)) return { kind, id };
  if (kind === "reroute" && graph.reroutes.some((r) => r.id === id)) return { kind, id };
  return null;
}

export function nodeBox(node: GraphNode): Box {
  return { ...node.position, width: node.measured?.width ?? UNMEASURED.width, height: node.measured?.height ?? UNMEASURED.height };
}

/** Where a note lies on the canvas. */
export const noteBox = (note: Note): Box => ({ x: note.pos[0], y: note.pos[1], width: note.size[0], height: note.size[1] });
const rerouteBox = (reroute: Reroute): Box => ({ x: reroute.pos[0], y: reroute.pos[1], width: 0, height: 0 });

export interface Members {
  nodes: Set<string>;
  notes: Set<string>;
  reroutes: Set<string>;
}

/** What a group carries when it moves: the nodes, notes and reroutes whose centre lies inside it. */
export function groupMembers(graph: Graph, group: Group): Members {
  return {
    nodes: new Set(graph.nodes.filter((n) => insideGroup(group, nodeBox(n))).map((n) => n.id)),
    notes: new Set(graph.notes.filter((n) => insideGroup(group, noteBox(n))).map((n) => n.id)),
    reroutes: new Set(graph.reroutes.filter((r) => insideGroup(group, rerouteBox(r))).map((r) => r.id)),
  };
}

/** The graph with a group's members moved by (dx, dy); `skip`: React Flow ids it moves itself. */
function moveMembers(graph: Graph, members: Members, dx: number, dy: number, skip: Set<string>): Graph {
  if (dx === 0 && dy === 0) return graph;
  const move = (x: number, y: number): [number, number] => [x + dx, y + dy];
  return {
    ...graph,
    nodes: graph.nodes.map((n) => members.nodes.has(n.id) && !skip.has(n.id)
      ? { ...n, position: { x: n.position.x + dx, y: n.position.y + dy } } : n),
    notes: graph.notes.map((n) => members.notes.has(n.id) && !skip.has(`note:${n.id}`) ? { ...n, pos: move(...n.pos) } : n),
    reroutes: graph.reroutes.map((r) => members.reroutes.has(r.id) && !skip.has(`reroute:${r.id}`) ? { ...r, pos: move(...r.pos) } : r),
  };
}

/** Members of the groups being dragged, fixed when each drag starts. */
const dragging = new Map<string, Members>();

/** The graph after React Flow's changes to its groups, notes and reroutes (`changes` holds only those;
 *  `alsoMoved`: the React Flow ids whose own position changes came in the same batch). */
export function applyElementChanges(graph: Graph, changes: NodeChange[], alsoMoved: Set<string>): Graph {
  let next = graph;
  for (const change of changes) {
    if (change.type === "add" || change.type === "replace") continue;
    const element = elementOf(change.id, next);
    if (element === null) continue;
    const { kind, id } = element;
    if (change.type === "remove") {
      next = kind === "group" ? { ...next, groups: next.groups.filter((g) => g.id !== id) }
        : kind === "note" ? { ...next, notes: next.notes.filter((n) => n.id !== id) }
        : { ...next, reroutes: next.reroutes.filter((r) => r.id !== id) };
    } else if (change.type === "select") {
      next = kind === "group" ? { ...next, groups: next.groups.map((g) => g.id === id ? { ...g, selected: change.selected } : g) }
        : kind === "note" ? { ...next, notes: next.notes.map((n) => n.id === id ? { ...n, selected: change.selected } : n) }
        : { ...next, reroutes: next.reroutes.map((r) => r.id === id ? { ...r, selected: change.selected } : r) };
    } else if (change.type === "position" && change.position) {
      const { x, y } = change.position;
      if (kind === "group") {
        const group = next.groups.find((g) => g.id === id) as Group;
        if (change.dragging !== undefined) {
          // A drag (not a resize from the top or left edge): what is inside moves along.
          let members = dragging.get(id);
          if (members === undefined) {
            members = groupMembers(next, group);
            dragging.set(id, members);
          }
          next = moveMembers(next, members, x - group.bounds[0], y - group.bounds[1], alsoMoved);
          if (change.dragging === false) dragging.delete(id);
        }
        const [, , w, h] = group.bounds;
        next = { ...next, groups: next.groups.map((g) => g.id === id ? { ...g, bounds: [x, y, w, h] } : g) };
      } else if (kind === "note") {
        next = { ...next, notes: next.notes.map((n) => n.id === id ? { ...n, pos: [x, y] } : n) };
      } else {
        next = { ...next, reroutes: next.reroutes.map((r) => r.id === id ? { ...r, pos: [x + REROUTE_RADIUS, y + REROUTE_RADIUS] } : r) };
      }
    } else if (change.type === "position" && change.dragging === false && kind === "group") {
      dragging.delete(id);
    } else if (change.type === "dimensions" && change.resizing !== undefined && change.dimensions) {
      // Only a resize by hand: React Flow also reports the measured size of every node it draws.
      const { width, height } = change.dimensions;
      if (kind === "group") {
        next = { ...next, groups: next.groups.map((g) => g.id === id ? { ...g, bounds: [g.bounds[0], g.bounds[1], width, height] } : g) };
      } else if (kind === "note") {
        next = { ...next, notes: next.notes.map((n) => n.id === id ? { ...n, size: [width, height] } : n) };
      }
    }
  }
  return next;
}
