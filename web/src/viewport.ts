// Where the canvas looks when a workflow is opened: all of it (nodes at their drawn size, groups, notes,
// reroute points) with a margin around it, centred, zoomed out as far as that needs but never in past
// 100% (a small graph is drawn at its size).

import { nodeBox, noteBox, REROUTE_RADIUS } from "./canvasElements";
import type { Graph } from "./graph";
import type { Box } from "./uiElements";

export interface Viewport {
  x: number;
  y: number;
  zoom: number;
}

/** The smallest zoom of the canvas (React Flow's minZoom): a graph too big to fit even so shows its top-left part. */
export const MIN_ZOOM = 0.1;
/** The largest zoom a workflow opens at: nodes are never drawn larger than their size. */
export const FIT_MAX_ZOOM = 1;
/** Screen pixels left free around a workflow opened. */
export const FIT_MARGIN = 40;

/** The box (canvas coordinates) around everything drawn of `graph`: each node at its measured size (as
 *  React Flow reported it; a default before), each group, note and reroute point. Null for an empty graph. */
export function graphBounds(graph: Graph): Box | null {
  const boxes: Box[] = [
    ...graph.nodes.map(nodeBox),
    ...graph.groups.map((group) => ({ x: group.bounds[0], y: group.bounds[1], width: group.bounds[2], height: group.bounds[3] })),
    ...graph.notes.map(noteBox),
    ...graph.reroutes.map((reroute) => ({ x: reroute.pos[0] - REROUTE_RADIUS, y: reroute.pos[1] - REROUTE_RADIUS,
                                          width: 2 * REROUTE_RADIUS, height: 2 * REROUTE_RADIUS })),
  ];
  if (boxes.length === 0) return null;
  const left = Math.min(...boxes.map((b) => b.x));
  const top = Math.min(...boxes.map((b) => b.y));
  const right = Math.max(...boxes.map((b) => b.x + b.width));
  const bottom = Math.max(...boxes.map((b) => b.y + b.height));
  return { x: left, y: top, width: right - left, height: bottom - top };
}

/** The viewport showing `bounds` (canvas coordinates) whole in a `width` x `height` view (pixels) with
 *  `margin` pixels around it: zoomed to fit, at most FIT_MAX_ZOOM and at least MIN_ZOOM, and centred.
 *  Only a graph too large even at MIN_ZOOM is aligned to the top or left along the axis it overflows. */
export function fitViewport(bounds: Box, width: number, height: number, margin = FIT_MARGIN): Viewport {
  // An axis with nothing to spread over (a single point) sets no limit.
  const along = (view: number, size: number) => size > 0 ? (view - 2 * margin) / size : Infinity;
  const fit = Math.min(along(width, bounds.width), along(height, bounds.height));
  const zoom = Math.max(MIN_ZOOM, Math.min(FIT_MAX_ZOOM, fit));
  const place = (start: number, size: number, view: number) => {
    const drawn = size * zoom;
    return drawn + 2 * margin <= view ? (view - drawn) / 2 - start * zoom : margin - start * zoom;
  };
  return { x: place(bounds.x, bounds.width, width), y: place(bounds.y, bounds.height, height), zoom };
}
