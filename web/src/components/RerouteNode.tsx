// A reroute point: a dot a link passes through, dragged to shape the link (double-click a link to add one).

import type { Node, NodeProps } from "@xyflow/react";

import type { Reroute } from "../uiElements";

export type RerouteData = { reroute: Reroute; color: string };

export function RerouteNode({ data }: NodeProps<Node<RerouteData, "reroute">>) {
  return <div className="reroute" data-testid={`reroute-${data.reroute.id}`} style={{ background: data.color }}
              title="reroute point: drag to move, Delete to remove" />;
}
