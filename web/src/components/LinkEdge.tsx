// A link between two sockets, through its reroute points in order.

import { BaseEdge, type Edge, type EdgeProps } from "@xyflow/react";

import { type Point, linkPath } from "../uiElements";

export type LinkData = { points: Point[] };

export function LinkEdge({ id, sourceX, sourceY, targetX, targetY, data, style }: EdgeProps<Edge<LinkData, "link">>) {
  const path = linkPath([[sourceX, sourceY], ...(data?.points ?? []), [targetX, targetY]]);
  return <BaseEdge id={id} path={path} style={style} interactionWidth={18} />;
}
