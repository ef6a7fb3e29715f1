// The editor's graph (nodes with positions, edges between named sockets) and the workflow
// document the server runs; conversion both ways, new nodes, links, copy and paste.

import type { Catalogue, NodeTypeSpec } from "./catalogue";
import { ANY_TYPE, canConnect } from "./catalogue";
import { COLOR, type Group, type Note, readUiElements, type Reroute, UiFormatError, writeUiElements } from "./uiElements";

export interface Link {
  from: string;
  output: string;
}

export interface WorkflowNode {
  type: string;
  inputs: Record<string, unknown>;
  [field: string]: unknown;
}

export interface UiNode {
  pos?: [number, number];
  title?: string;
  color?: string;
  collapsed?: boolean;
  randomize?: string[];
  [key: string]: unknown;
}

export interface WorkflowDocument {
  version: number;
  nodes: Record<string, WorkflowNode>;
  ui?: { nodes?: Record<string, UiNode>; [key: string]: unknown };
  [field: string]: unknown;
}

/** A node that does not run as usual (the document's `mode`): bypassed, its outputs are fed by its
 *  inputs of the same type; muted, it never runs. */
export type NodeMode = "bypass" | "mute";
export const NODE_MODES: NodeMode[] = ["bypass", "mute"];

export interface GraphNodeData {
  [key: string]: unknown;
  nodeType: string;
  mode?: NodeMode;
  /** Literal input values; a linked input's value is kept here too, for when the link goes. */
  values: Record<string, unknown>;
  /** Seed inputs given a new random value after each run. */
  randomize?: string[];
  /** The name shown instead of the type's (ui.nodes[id].title). */
  title?: string;
  /** The title bar's colour, "#rrggbb" (ui.nodes[id].color). */
  color?: string;
  /** Drawn as its title bar alone (ui.nodes[id].collapsed). */
  collapsed?: boolean;
  /** The node's fields in the document other than `type`, `inputs` and `mode`, kept as they came. */
  fields?: Record<string, unknown>;
  /** Its `ui.nodes` fields the editor does not own, kept as they came. */
  uiFields?: Record<string, unknown>;
}

export interface GraphNode {
  id: string;
  type: "graph";
  position: { x: number; y: number };
  data: GraphNodeData;
  selected?: boolean;
  /** Its drawn size, once React Flow has measured it. */
  measured?: { width?: number; height?: number };
}

export interface GraphEdge {
  id: string;
  source: string;
  sourceHandle: string;
  target: string;
  targetHandle: string;
  selected?: boolean;
}

export interface Graph {
  nodes: GraphNode[];
  edges: GraphEdge[];
  groups: Group[];
  notes: Note[];
  reroutes: Reroute[];
  /** What the document holds that the editor does not own, written back unchanged when it is saved. */
  document?: DocumentFields;
}

export interface DocumentFields {
  version?: unknown;
  /** Top-level fields other than `version`, `nodes` and `ui`. */
  fields: Record<string, unknown>;
  /** `ui` fields other than `nodes`, `groups`, `notes` and `reroutes` (a description, ...). */
  ui: Record<string, unknown>;
}

const isRecord = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);

/** The fields of `record` other than `owned`, or undefined if there are none. */
function otherFields(record: unknown, owned: string[]): Record<string, unknown> | undefined {
  if (!isRecord(record)) return undefined;
  const rest = Object.fromEntries(Object.entries(record).filter(([key]) => !owned.includes(key)));
  return Object.keys(rest).length > 0 ? rest : undefined;
}

export class WorkflowFormatError extends Error {}

export function emptyGraph(): Graph {
  return { nodes: [], edges: [], groups: [], notes: [], reroutes: [] };
}

/** The ui.nodes fields the editor owns. */
const UI_NODE_FIELDS = ["pos", "randomize", "title", "color", "collapsed"];

export function isLink(value: unknown): value is Link {
  return typeof value === "object" && value !== null && !Array.isArray(value)
    && typeof (value as Link).from === "string" && typeof (value as Link).output === "string"
    && Object.keys(value).length === 2;
}

export function edgeId(target: string, input: string): string {
  // One link per input, so the target socket names the edge.
  return `${target}:${input}`;
}

/** The graph a workflow document describes; nodes without a saved position are laid out in a row. */
export function workflowToGraph(document: unknown): Graph {
  if (typeof document !== "object" || document === null || typeof (document as WorkflowDocument).nodes !== "object") {
    throw new WorkflowFormatError('not a nodegraph workflow: expected {"version": 1, "nodes": {...}}');
  }
  const doc = document as WorkflowDocument;
  const nodes: GraphNode[] = [];
  const edges: GraphEdge[] = [];
  let column = 0;
  for (const [id, node] of Object.entries(doc.nodes)) {
    if (typeof node?.type !== "string") throw new WorkflowFormatError(`node ${id}: missing "type"`);
    const ui = doc.ui?.nodes?.[id];
    const saved = ui?.pos;
    const position = Array.isArray(saved) && saved.length === 2
      ? { x: Number(saved[0]), y: Number(saved[1]) }
      : { x: 40 + 260 * column++, y: 80 };
    const values: Record<string, unknown> = {};
    for (const [name, value] of Object.entries(node.inputs ?? {})) {
      if (isLink(value)) {
        edges.push({ id: edgeId(id, name), source: value.from, sourceHandle: value.output, target: id, targetHandle: name });
      } else {
        values[name] = value;
      }
    }
    const data: GraphNodeData = { nodeType: node.type, values };
    if (NODE_MODES.includes(node.mode as NodeMode)) data.mode = node.mode as NodeMode;
    if (Array.isArray(ui?.randomize) && ui.randomize.length > 0) data.randomize = ui.randomize.map(String);
    if (typeof ui?.title === "string" && ui.title !== "") data.title = ui.title;
    if (typeof ui?.color === "string" && COLOR.test(ui.color)) data.color = ui.color;
    if (ui?.collapsed === true) data.collapsed = true;
    // A mode the editor does not know is kept as it came (the server says what is wrong with it).
    const fields = otherFields(node, data.mode ? ["type", "inputs", "mode"] : ["type", "inputs"]);
    if (fields) data.fields = fields;
    // A title, colour or collapsed flag the editor cannot read stays as it came.
    const owned = UI_NODE_FIELDS.filter((key) => key === "pos" || key === "randomize" || data[key] !== undefined);
    const uiFields = otherFields(ui, owned);
    if (uiFields) data.uiFields = uiFields;
    nodes.push({ id, type: "graph", position, data });
  }
  let elements;
  try {
    elements = readUiElements(doc.ui);
  } catch (error) {
    if (error instanceof UiFormatError) throw new WorkflowFormatError(error.message);
    throw error;
  }
  const kept: DocumentFields = { fields: otherFields(doc, ["version", "nodes", "ui"]) ?? {},
                                 ui: otherFields(doc.ui, ["nodes", "groups", "notes", "reroutes"]) ?? {} };
  if (doc.version !== undefined) kept.version = doc.version;
  return pruneReroutes({ nodes, edges, ...elements, document: kept });
}

/** The workflow document for a graph, node positions in its `ui` block, with every field the loaded
 *  document held that the editor does not own. */
export function graphToWorkflow(graph: Graph): WorkflowDocument {
  const nodes: Record<string, WorkflowNode> = {};
  const positions: Record<string, UiNode> = {};
  for (const node of graph.nodes) {
    nodes[node.id] = { type: node.data.nodeType, inputs: { ...node.data.values }, ...node.data.fields };
    if (node.data.mode) nodes[node.id].mode = node.data.mode;
    const ui: UiNode = { ...node.data.uiFields, pos: [Math.round(node.position.x), Math.round(node.position.y)] };
    if (node.data.title) ui.title = node.data.title;
    if (node.data.color) ui.color = node.data.color;
    if (node.data.collapsed) ui.collapsed = true;
    if (node.data.randomize && node.data.randomize.length > 0) ui.randomize = [...node.data.randomize];
    positions[node.id] = ui;
  }
  for (const edge of graph.edges) {
    const target = nodes[edge.target];
    if (target !== undefined && nodes[edge.source] !== undefined) {
      target.inputs[edge.targetHandle] = { from: edge.source, output: edge.sourceHandle };
    }
  }
  const kept = graph.document;
  const version = typeof kept?.version === "number" ? kept.version : 1;
  return { ...kept?.fields, version, nodes, ui: { ...kept?.ui, nodes: positions, ...writeUiElements(graph) } };
}

/** The graph with `mode` toggled on the nodes `ids`: set on all of them, or taken off if all have it. */
export function toggleMode(graph: Graph, ids: Set<string>, mode: NodeMode): Graph {
  const chosen = graph.nodes.filter((node) => ids.has(node.id));
  const off = chosen.length > 0 && chosen.every((node) => node.data.mode === mode);
  return { ...graph, nodes: graph.nodes.map((node) => {
    if (!ids.has(node.id)) return node;
    const { mode: _old, ...data } = node.data;
    return { ...node, data: off ? data : { ...data, mode } };
  }) };
}

/** An id for a new node of `type`, unused in `taken`: the type in snake case, numbered. */
export function newNodeId(type: string, taken: Set<string>): string {
  // KSampler -> ksampler, EmptyLatent -> empty_latent, VAEDecode -> vae_decode
  const base = type.replace(/([a-z0-9])([A-Z])/g, "$1_$2").replace(/([A-Z]{2,})([A-Z][a-z])/g, "$1_$2").toLowerCase() || "node";
  for (let n = 1; ; n++) {
    const id = n === 1 ? base : `${base}_${n}`;
    if (!taken.has(id)) return id;
  }
}

/** A new node of a catalogue type, its literal inputs set to their defaults. */
export function createNode(spec: NodeTypeSpec, id: string, position: { x: number; y: number }): GraphNode {
  const values: Record<string, unknown> = {};
  for (const [name, input] of Object.entries(spec.inputs)) {
    if (input.link_only) continue;
    if (input.default !== undefined) values[name] = input.default;
    else if (input.choices !== undefined && input.choices.length > 0 && input.required) values[name] = input.choices[0];
  }
  return { id, type: "graph", position, data: { nodeType: spec.type, values } };
}

/** The graph with every input that has a schema default holding a value: what a widget shows is
 *  what the run uses (a document may leave defaults out). Linked inputs get one too, shown again
 *  if the link goes. Nodes of unknown types are left as they are; unchanged nodes keep their identity. */
export function withDefaults(graph: Graph, catalogue: Catalogue): Graph {
  let changed = false;
  const nodes = graph.nodes.map((node) => {
    const spec = catalogue.nodes[node.data.nodeType];
    if (spec === undefined) return node;
    const missing = Object.entries(spec.inputs).filter(([name, input]) =>
      !input.link_only && input.default !== undefined && input.default !== null && node.data.values[name] === undefined);
    if (missing.length === 0) return node;
    changed = true;
    const values = { ...node.data.values };
    for (const [name, input] of missing) values[name] = structuredClone(input.default);
    return { ...node, data: { ...node.data, values } };
  });
  return changed ? { ...graph, nodes } : graph;
}

export interface Connection {
  source: string;
  sourceHandle: string;
  target: string;
  targetHandle: string;
}

/** Why a connection may not be made, or null if it may (the socket types must be compatible). */
export function connectionProblem(catalogue: Catalogue, graph: Graph, connection: Connection): string | null {
  if (connection.source === connection.target) return "a node cannot feed itself";
  const source = graph.nodes.find((node) => node.id === connection.source);
  const target = graph.nodes.find((node) => node.id === connection.target);
  const output = source && catalogue.nodes[source.data.nodeType]?.outputs[connection.sourceHandle];
  const input = target && catalogue.nodes[target.data.nodeType]?.inputs[connection.targetHandle];
  if (!output || !input) return "unknown socket";
  if (!canConnect(catalogue, output.type, input.type)) return `${output.type} cannot feed ${input.type}`;
  if (reaches(graph, connection.target, connection.source)) return "the link would make a cycle";
  return null;
}

function reaches(graph: Graph, from: string, to: string): boolean {
  const seen = new Set<string>();
  const stack = [from];
  while (stack.length > 0) {
    const current = stack.pop() as string;
    if (current === to) return true;
    if (seen.has(current)) continue;
    seen.add(current);
    for (const edge of graph.edges) if (edge.source === current) stack.push(edge.target);
  }
  return false;
}

/** The graph with the link added, replacing any link into the same input. The input's literal value
 *  stays with the node (the link overrides it in the document) and is used again if the link goes. */
export function connect(graph: Graph, connection: Connection): Graph {
  const id = edgeId(connection.target, connection.targetHandle);
  const replaced = graph.edges.find((edge) => edge.id === id);
  const edges = graph.edges.filter((edge) => edge.id !== id);
  edges.push({ id, ...connection });
  const sameLink = replaced?.source === connection.source && replaced.sourceHandle === connection.sourceHandle;
  // The points of a replaced link were on its way, not the new one's.
  const reroutes = replaced && !sameLink
    ? graph.reroutes.filter((r) => r.to.node !== connection.target || r.to.input !== connection.targetHandle) : graph.reroutes;
  return { ...graph, edges, reroutes };
}

/** The graph without reroute points whose link is gone. */
export function pruneReroutes(graph: Graph): Graph {
  const links = new Set(graph.edges.map((edge) => edgeId(edge.target, edge.targetHandle)));
  const reroutes = graph.reroutes.filter((r) => links.has(edgeId(r.to.node, r.to.input)));
  return reroutes.length === graph.reroutes.length ? graph : { ...graph, reroutes };
}

/** The graph without the given nodes (and their links) and edges. */
export function removeItems(graph: Graph, nodeIds: Set<string>, edgeIds: Set<string>): Graph {
  return pruneReroutes({
    ...graph,
    nodes: graph.nodes.filter((node) => !nodeIds.has(node.id)),
    edges: graph.edges.filter((edge) => !edgeIds.has(edge.id) && !nodeIds.has(edge.source) && !nodeIds.has(edge.target)),
  });
}

export interface Snippet {
  nodes: GraphNode[];
  edges: GraphEdge[];
}

/** The selected nodes and the links among them, for the clipboard. */
export function copySelection(graph: Graph, selected: Set<string>): Snippet {
  return {
    nodes: graph.nodes.filter((node) => selected.has(node.id)).map((node) => structuredClone({ ...node, selected: false })),
    edges: graph.edges.filter((edge) => selected.has(edge.source) && selected.has(edge.target))
      .map((edge) => ({ ...edge, selected: false })),
  };
}

/** The graph with a snippet pasted in: fresh ids, shifted by `offset`, the pasted nodes selected. */
export function paste(graph: Graph, snippet: Snippet, offset: { x: number; y: number }): Graph {
  const taken = new Set(graph.nodes.map((node) => node.id));
  const renamed = new Map<string, string>();
  const nodes: GraphNode[] = graph.nodes.map((node) => ({ ...node, selected: false }));
  for (const node of snippet.nodes) {
    const id = newNodeId(node.data.nodeType, taken);
    taken.add(id);
    renamed.set(node.id, id);
    nodes.push({ ...structuredClone(node), id, selected: true,
                 position: { x: node.position.x + offset.x, y: node.position.y + offset.y } });
  }
  const edges: GraphEdge[] = graph.edges.map((edge) => ({ ...edge, selected: false }));
  for (const edge of snippet.edges) {
    const source = renamed.get(edge.source) as string;
    const target = renamed.get(edge.target) as string;
    edges.push({ ...edge, id: edgeId(target, edge.targetHandle), source, target });
  }
  return { ...graph, nodes, edges };
}

export interface Size {
  width: number;
  height: number;
}

/** Whether any two nodes' boxes overlap (sizes as measured on the canvas). */
export function hasOverlaps(graph: Graph, sizes: Map<string, Size>): boolean {
  const boxes = graph.nodes.flatMap((node) => {
    const size = sizes.get(node.id);
    return size ? [{ ...node.position, ...size }] : [];
  });
  return boxes.some((a, i) => boxes.slice(i + 1).some((b) =>
    a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height));
}

/** Positions for a left-to-right layered layout: a node's column is the longest chain of links
 *  leading to it; within a column nodes keep their top-to-bottom order and are stacked. */
export function arrange(graph: Graph, sizes: Map<string, Size>, gap = { x: 60, y: 30 }): Graph {
  const depth = new Map<string, number>();
  const inputsOf = new Map<string, string[]>();
  for (const edge of graph.edges) inputsOf.set(edge.target, [...(inputsOf.get(edge.target) ?? []), edge.source]);
  const depthOf = (id: string, visiting: Set<string>): number => {
    const known = depth.get(id);
    if (known !== undefined) return known;
    if (visiting.has(id)) return 0;  // a cycle (invalid anyway): stop here
    visiting.add(id);
    const sources = inputsOf.get(id) ?? [];
    const value = sources.length === 0 ? 0 : 1 + Math.max(...sources.map((source) => depthOf(source, visiting)));
    depth.set(id, value);
    return value;
  };
  const columns: GraphNode[][] = [];
  for (const node of graph.nodes) (columns[depthOf(node.id, new Set())] ??= []).push(node);
  const positions = new Map<string, { x: number; y: number }>();
  let x = 0;
  for (const column of columns.filter(Boolean)) {
    column.sort((a, b) => a.position.y - b.position.y || a.position.x - b.position.x);
    let y = 0;
    let width = 0;
    for (const node of column) {
      const size = sizes.get(node.id) ?? { width: 240, height: 120 };
      positions.set(node.id, { x, y });
      y += size.height + gap.y;
      width = Math.max(width, size.width);
    }
    x += width + gap.x;
  }
  return { ...graph, nodes: graph.nodes.map((node) => ({ ...node, position: positions.get(node.id) ?? node.position })) };
}

/** Where to put a new node wanted at `position`: there, or moved down and right past any node already
 *  there, so nodes added one after another never sit on one spot. */
export function freeSpot(graph: Graph, position: { x: number; y: number }, step = 32): { x: number; y: number } {
  let spot = { ...position };
  const taken = (at: { x: number; y: number }) => graph.nodes.some((node) =>
    Math.abs(node.position.x - at.x) < step / 2 && Math.abs(node.position.y - at.y) < step / 2);
  for (let tries = 0; taken(spot) && tries < 200; tries++) spot = { x: spot.x + step, y: spot.y + step };
  return spot;
}

/** The graph with each unlinked required link input of node `nodeId` linked, where exactly one output in
 *  the graph can feed it and that output does not feed the node already (a sampler's positive prompt
 *  is not also taken as its negative). Inputs that take anything are left alone. Returns the links made. */
export function linkUnambiguousInputs(catalogue: Catalogue, graph: Graph, nodeId: string): { graph: Graph; linked: Connection[] } {
  const node = graph.nodes.find((n) => n.id === nodeId);
  const spec = node && catalogue.nodes[node.data.nodeType];
  if (!spec) return { graph, linked: [] };
  let next = graph;
  const linked: Connection[] = [];
  for (const [input, inputSpec] of Object.entries(spec.inputs)) {
    if (!inputSpec.required || !inputSpec.link_only || inputSpec.type === ANY_TYPE) continue;
    if (next.edges.some((edge) => edge.target === nodeId && edge.targetHandle === input)) continue;
    const feeding = new Set(next.edges.filter((edge) => edge.target === nodeId).map((edge) => `${edge.source}\u0000${edge.sourceHandle}`));
    const candidates: Connection[] = [];
    for (const source of next.nodes) {
      if (source.id === nodeId) continue;
      for (const [output, outputSpec] of Object.entries(catalogue.nodes[source.data.nodeType]?.outputs ?? {})) {
        if (outputSpec.type === ANY_TYPE || !canConnect(catalogue, outputSpec.type, inputSpec.type)) continue;
        candidates.push({ source: source.id, sourceHandle: output, target: nodeId, targetHandle: input });
      }
    }
    if (candidates.length !== 1) continue;
    const [only] = candidates;
    if (feeding.has(`${only.source}\u0000${only.sourceHandle}`) || connectionProblem(catalogue, next, only) !== null) continue;
    next = connect(next, only);
    linked.push(only);
  }
  return { graph: next, linked };
}
