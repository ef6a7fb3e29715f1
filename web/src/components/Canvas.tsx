// The canvas: React Flow over the store's graph; links made, refused, pulled off an input or let go in
// empty space (which opens the node search); double-click opens the search; palette and file drops.

import {
  Background, Controls, type FinalConnectionState, MiniMap, type Node, ReactFlow, useReactFlow,
  type Connection as FlowConnection, type IsValidConnection,
} from "@xyflow/react";
import { type DragEvent, type MouseEvent as ReactMouseEvent, useEffect, useMemo, useRef, useState } from "react";

import { canvasActions } from "../canvasActions";
import { elementOf, REROUTE_RADIUS } from "../canvasElements";
import type { Graph, GraphEdge, Size } from "../graph";
import { actions, type ContextMenu as ContextMenuState, type DraggedLink, getState, useEditor } from "../store";
import { pointsOf } from "../uiElements";
import { fitViewport, graphBounds, MIN_ZOOM } from "../viewport";
import { FrameNode } from "./FrameNode";
import { GraphNode } from "./GraphNode";
import { LinkEdge } from "./LinkEdge";
import { NoteNode } from "./NoteNode";
import { PALETTE_DRAG_TYPE } from "./Panels";
import { RerouteNode } from "./RerouteNode";

const nodeTypes = { graph: GraphNode, frame: FrameNode, note: NoteNode, reroute: RerouteNode };
const edgeTypes = { link: LinkEdge };

/** The colour of the link into `edge`'s target: its output's socket type. */
function linkColor(graph: Graph, edge: GraphEdge): string | undefined {
  const { catalogue } = getState();
  const source = graph.nodes.find((node) => node.id === edge.source);
  const type = source && catalogue?.nodes[source.data.nodeType]?.outputs[edge.sourceHandle]?.type;
  return type ? catalogue?.types[type]?.color : undefined;
}

/** What React Flow draws: groups behind everything, notes, the graph's nodes, reroute points on top. */
function flowNodes(graph: Graph): Node[] {
  const edgeColor = new Map(graph.edges.map((edge) => [edge.id, linkColor(graph, edge)]));
  return [
    ...graph.groups.map((group) => ({
      id: `group:${group.id}`, type: "frame", position: { x: group.bounds[0], y: group.bounds[1] },
      width: group.bounds[2], height: group.bounds[3], data: { group }, selected: group.selected ?? false,
      zIndex: -1, dragHandle: ".frame-title", style: { pointerEvents: "none" as const },
    })),
    ...graph.notes.map((note) => ({
      id: `note:${note.id}`, type: "note", position: { x: note.pos[0], y: note.pos[1] }, width: note.size[0],
      height: note.size[1], data: { note }, selected: note.selected ?? false,
    })),
    ...(graph.nodes as Node[]),
    ...graph.reroutes.map((reroute) => ({
      id: `reroute:${reroute.id}`, type: "reroute", position: { x: reroute.pos[0] - REROUTE_RADIUS, y: reroute.pos[1] - REROUTE_RADIUS },
      width: 2 * REROUTE_RADIUS, height: 2 * REROUTE_RADIUS, selected: reroute.selected ?? false, zIndex: 10,
      data: { reroute, color: edgeColor.get(`${reroute.to.node}:${reroute.to.input}`) ?? "#9e9e9e" },
    })),
  ];
}

/** How near (screen pixels) a let-go link must be to a socket to join it: sockets and their labels are easy to hit. */
const CONNECTION_RADIUS = 36;

/** Groups as their colour, faint; notes yellowish; nodes grey. */
function minimapColor(node: Node): string {
  if (node.type === "frame") return `${(node.data as { group: { color: string } }).group.color}55`;
  return node.type === "note" ? "#6b6440" : "#4a4e5a";
}

export function measuredSizes(nodes: { id: string; measured?: { width?: number; height?: number } }[]): Map<string, Size> {
  return new Map(nodes.map((node) => [node.id, { width: node.measured?.width ?? 240, height: node.measured?.height ?? 120 }]));
}

function asConnection(connection: FlowConnection | GraphEdge) {
  return { source: connection.source, sourceHandle: connection.sourceHandle ?? "",
           target: connection.target, targetHandle: connection.targetHandle ?? "" };
}

/** The link a drag that ended on a socket asked for, whichever end it started from. */
function droppedConnection(state: FinalConnectionState) {
  const from = state.fromHandle;
  const to = state.toHandle;
  if (from === null || to === null) return null;
  const [source, target] = from.type === "source" ? [from, to] : [to, from];
  return { source: source.nodeId, sourceHandle: source.id ?? "", target: target.nodeId, targetHandle: target.id ?? "",
           sameKind: from.type === to.type };
}

/** The socket type of a node's input or output, from the catalogue. */
function socketType(nodeId: string, socket: string, kind: "input" | "output"): string | undefined {
  const { catalogue, history } = getState();
  const node = history.present.nodes.find((n) => n.id === nodeId);
  const spec = node && catalogue?.nodes[node.data.nodeType];
  return kind === "input" ? spec?.inputs[socket]?.type : spec?.outputs[socket]?.type;
}

function clientPoint(event: MouseEvent | TouchEvent): { x: number; y: number } {
  const point = "changedTouches" in event ? event.changedTouches[0] : event;
  return { x: point.clientX, y: point.clientY };
}

/** Show a loaded workflow at once (React Flow's fitView waits for the next node update, which may be
 *  a cleared canvas's first node): all of it, as the store's graph has it after its nodes were measured
 *  (viewport.ts). */
export function fitNow(flow: ReturnType<typeof useReactFlow>): void {
  const box = document.querySelector(".canvas")?.getBoundingClientRect();
  const bounds = graphBounds(getState().history.present);
  if (!box || bounds === null) return;
  const viewport = fitViewport(bounds, box.width, box.height);
  void flow.setViewport(viewport);
  actions.rememberViewport(viewport);
}

export function Canvas() {
  const graph = useEditor((s) => s.history.present);
  const catalogue = useEditor((s) => s.catalogue);
  const nodes = useMemo(() => flowNodes(graph), [graph, catalogue]);
  const loads = useEditor((s) => s.loads);
  const minimap = useEditor((s) => s.showMinimap);
  const flow = useReactFlow();
  /** The link being pulled off an input (hidden while it is dragged from its output). */
  const [pulling, setPulling] = useState<GraphEdge | null>(null);
  const pulled = useRef<{ edge: GraphEdge; connected: boolean } | null>(null);
  useEffect(() => {
    // Bring a newly loaded workflow into view once React Flow has measured all of its nodes.
    let frames = 0;
    let handle = 0;
    const fitWhenMeasured = () => {
      const wanted = new Set(getState().history.present.nodes.map((node) => node.id));
      const shown = flow.getNodes().filter((node) => wanted.has(node.id) && node.measured?.width);
      if (shown.length === wanted.size) {
        // (Groups and notes have their size in the document: a graph of only those fits at once.)
        if (wanted.size > 0) actions.arrange(measuredSizes(shown), true);
        handle = requestAnimationFrame(() => fitNow(flow));
      } else if (frames++ < 300) {
        handle = requestAnimationFrame(fitWhenMeasured);
      }
    };
    handle = requestAnimationFrame(fitWhenMeasured);
    return () => cancelAnimationFrame(handle);
  }, [loads, flow]);

  const graphId = useEditor((s) => s.graphId);
  useEffect(() => {
    // Another tab opened: the canvas looks where it looked when that tab was left.
    const viewport = getState().viewport;
    if (viewport) void flow.setViewport(viewport);
  }, [graphId, flow]);

  const isValidConnection: IsValidConnection = (connection) => actions.canConnect(asConnection(connection as FlowConnection));
  const styledEdges = graph.edges.filter((edge) => edge.id !== pulling?.id).map((edge) => {
    const color = linkColor(graph, edge);
    const points = pointsOf(graph.reroutes, edge.target, edge.targetHandle).map((r) => r.pos);
    return { ...edge, type: "link", data: { points }, ...(color ? { style: { stroke: color, strokeWidth: 2.5 } } : {}) };
  });

  /** A double-click on a link puts a reroute point there. */
  const onEdgeDoubleClick = (event: ReactMouseEvent, edge: { target: string; targetHandle?: string | null; source: string; sourceHandle?: string | null }) => {
    const end = (kind: string, node: string, handle: string) => {
      const element = document.querySelector(`.react-flow__handle.${kind}[data-nodeid="${CSS.escape(node)}"][data-handleid="${CSS.escape(handle)}"]`);
      const box = element?.getBoundingClientRect();
      const point = box ? flow.screenToFlowPosition({ x: box.left + box.width / 2, y: box.top + box.height / 2 }) : { x: 0, y: 0 };
      return [point.x, point.y] as [number, number];
    };
    const at = flow.screenToFlowPosition({ x: event.clientX, y: event.clientY });
    canvasActions.addReroute(edge.target, edge.targetHandle ?? "", [at.x, at.y], end("source", edge.source, edge.sourceHandle ?? ""),
                             end("target", edge.target, edge.targetHandle ?? ""));
  };

  const openSearch = (screen: { x: number; y: number }, link?: DraggedLink) => {
    actions.openSearch({ screen, at: flow.screenToFlowPosition(screen), link });
  };

  /** A press on an input that has a link pulls the link off it: the drag continues from the link's
   *  output, so it can be dropped on another input, or in empty space to choose a new node. */
  const onMouseDownCapture = (event: ReactMouseEvent) => {
    // React Flow keeps the press on its pane and sockets from moving the focus: leave a field being typed
    // in, so what was typed is taken (a number field takes its value when left).
    const focused = document.activeElement;
    const target = event.target as HTMLElement;
    if (focused instanceof HTMLElement && focused !== target && !focused.contains(target)
        && ["INPUT", "TEXTAREA", "SELECT"].includes(focused.tagName) && !["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName)) {
      focused.blur();
    }
    const handle = (event.target as HTMLElement).closest?.(".react-flow__handle.target") as HTMLElement | null;
    if (handle === null || event.button !== 0) return;
    const edge = getState().history.present.edges.find((e) =>
      e.target === handle.dataset.nodeid && e.targetHandle === handle.dataset.handleid);
    const source = edge && document.querySelector<HTMLElement>(
      `.react-flow__handle.source[data-nodeid="${CSS.escape(edge.source)}"][data-handleid="${CSS.escape(edge.sourceHandle)}"]`);
    if (!edge || !source) return;
    event.stopPropagation();
    event.preventDefault();
    pulled.current = { edge, connected: false };
    setPulling(edge);
    source.dispatchEvent(new MouseEvent("mousedown", { bubbles: true, cancelable: true, button: 0, buttons: 1,
                                                       clientX: event.clientX, clientY: event.clientY }));
  };

  const onConnect = (connection: FlowConnection) => {
    const pull = pulled.current;
    if (pull !== null) {
      pull.connected = true;
      actions.moveLink(pull.edge, asConnection(connection));
    } else {
      actions.connect(asConnection(connection));
    }
  };

  const onConnectEnd = (event: MouseEvent | TouchEvent, state: FinalConnectionState) => {
    const pull = pulled.current;
    pulled.current = null;
    setPulling(null);
    if (pull?.connected) return;
    const from = state.fromHandle;
    if (state.isValid === false || (state.toHandle !== null && !state.isValid)) {
      // React Flow drops a refused link without a word: say why it was refused.
      const dropped = droppedConnection(state);
      if (dropped !== null) actions.explainRefusedLink(dropped, dropped.sameKind);
      if (pull) actions.removeLink(pull.edge.id);
      return;
    }
    const target = event.target as Element | null;
    const onNode = target?.closest?.(".react-flow__node-graph") as HTMLElement | null;
    if (from !== null && state.toHandle === null) {
      const kind = from.type === "source" ? "output" : "input";
      const type = socketType(from.nodeId, from.id ?? "", kind);
      const link: DraggedLink | undefined = type === undefined ? undefined
        : { from: kind, type, nodeId: from.nodeId, socket: from.id ?? "", replaces: pull?.edge.id };
      if (link !== undefined && onNode?.dataset.id !== undefined) {
        // Let go on a node but not on a socket: the first free socket there that fits.
        if (actions.linkToNode(link, onNode.dataset.id)) return;
      } else if (link !== undefined && onNode === null) {
        openSearch(clientPoint(event), link);
        return;
      }
    }
    if (pull) actions.removeLink(pull.edge.id);
  };

  const openMenu = (event: ReactMouseEvent | MouseEvent, target: ContextMenuState["target"]) => {
    event.preventDefault();
    const screen = { x: event.clientX, y: event.clientY };
    actions.openMenu({ screen, at: flow.screenToFlowPosition(screen), target });
  };
  const onNodeContextMenu = (event: ReactMouseEvent, node: Node) => {
    const element = elementOf(node.id, getState().history.present);
    openMenu(event, element ? { kind: element.kind === "group" ? "group" : element.kind, id: element.id } : { kind: "node", id: node.id });
  };

  const onDoubleClick = (event: ReactMouseEvent) => {
    if ((event.target as HTMLElement).classList.contains("react-flow__pane")) openSearch({ x: event.clientX, y: event.clientY });
  };

  const onDrop = (event: DragEvent) => {
    event.preventDefault();
    const type = event.dataTransfer.getData(PALETTE_DRAG_TYPE);
    if (type) {
      actions.addNode(type, flow.screenToFlowPosition({ x: event.clientX, y: event.clientY }));
      return;
    }
    const file = event.dataTransfer.files[0];
    if (file) void actions.openFile(file);
  };

  // The view is kept on every move, not when a move ends: a wheel's zoom ends a moment after its last
  // turn, and a tab switched to meanwhile would be given the view of the one left.
  return (
    <div className="canvas" onDrop={onDrop} onDragOver={(event) => event.preventDefault()} data-testid="canvas"
         onMouseDownCapture={onMouseDownCapture} onDoubleClick={onDoubleClick}>
      <ReactFlow nodes={nodes} edges={styledEdges} nodeTypes={nodeTypes} edgeTypes={edgeTypes} onEdgeDoubleClick={onEdgeDoubleClick}
                 onMove={(_, viewport) => actions.rememberViewport(viewport)}
                 onPaneContextMenu={(event) => openMenu(event, { kind: "canvas" })} onNodeContextMenu={onNodeContextMenu}
                 onEdgeContextMenu={(event, edge) => openMenu(event, { kind: "link", id: edge.id })}
                 onNodesChange={actions.nodesChanged} onEdgesChange={actions.edgesChanged}
                 onConnect={onConnect} onConnectEnd={onConnectEnd} connectionRadius={CONNECTION_RADIUS}
                 isValidConnection={isValidConnection} deleteKeyCode={["Delete", "Backspace"]} zoomOnDoubleClick={false}
                 multiSelectionKeyCode={["Shift", "Meta", "Control"]} minZoom={MIN_ZOOM}>
        <Background />
        <Controls />
        {minimap && <MiniMap pannable zoomable bgColor="#1e1f24" maskColor="#0009" nodeColor={minimapColor} />}
      </ReactFlow>
    </div>
  );
}
