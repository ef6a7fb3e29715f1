// The editor's one store: the graph with its undo history, the catalogue, runs and messages.
// Components read it with useEditor(selector) and change it only through `actions`.

import { applyEdgeChanges, applyNodeChanges, type EdgeChange, type NodeChange } from "@xyflow/react";
import { useSyncExternalStore } from "react";

import { api, ApiError } from "./api";
import { type Catalogue, randomSeed, widgetFor } from "./catalogue";
import { comfyEditorExtras, leftOut, withRandomizedSeeds } from "./comfyEditorFile";
import { applyElementChanges, elementOf } from "./canvasElements";
import {
  arrange, connect, type Connection, connectionProblem, copySelection, createNode, emptyGraph, freeSpot, type Graph,
  type GraphEdge, type GraphNode, graphToWorkflow, hasOverlaps, linkUnambiguousInputs, newNodeId, type NodeMode, paste,
  pruneReroutes, removeItems, type Size, type Snippet, toggleMode, withDefaults, workflowToGraph,
} from "./graph";
import { type History, record, redo, replace, startHistory, undo } from "./history";
import { type LinkFilter, nodeUsage } from "./nodeSearch";
import { workflowFromPng } from "./pngWorkflow";
import { blank, edited, neighbourOf, readStoredTabs, type StoredTab, storedTab, type Tab, TABS_KEY } from "./tabs";
import type { Viewport } from "./viewport";
import {
  applyEvent, emptyRuns, graphRunView, issuesByNode, type NodeMedia, type NodeRunState, runsFromApi, type RunsState,
  type ServerEvent, withoutRun,
} from "./runState";

export const SAVED_GRAPH_KEY = "nodegraph.graph";
/** Which graph each run was submitted from (run id -> graph id), newest last. */
export const RUN_GRAPHS_KEY = "nodegraph.runGraphs";
const RUN_GRAPHS_KEPT = 500;
export const DEFAULT_WORKFLOW = "txt2img.json";

export type Dialog = { kind: "overwrite"; name: string } | { kind: "saveAs"; name: string };

/** A link being dragged when the search opened: it joins the node chosen. `replaces`: the link it was
 *  pulled off an input as (it goes, whether or not a node is chosen). */
export interface DraggedLink extends LinkFilter {
  nodeId: string;
  socket: string;
  replaces?: string;
}

/** A right-click menu at `screen` (page pixels; `at`: the same point on the canvas) for what was clicked. */
export interface ContextMenu {
  screen: { x: number; y: number };
  at: { x: number; y: number };
  target: { kind: "canvas" } | { kind: "node" | "link" | "group" | "note" | "reroute"; id: string };
}

/** The node search box, open at `screen` (page pixels) to add a node at `at` (canvas coordinates). */
export interface SearchRequest {
  screen: { x: number; y: number };
  at: { x: number; y: number };
  link?: DraggedLink;
  /** The text typed to open it (typing on the canvas starts a search). */
  query?: string;
  /** Which opening this is (set by openSearch). */
  serial?: number;
}

export const UNTITLED = "untitled.json";

/** A name typed for saving, as a workflow file name. */
export function workflowFileName(name: string): string {
  const trimmed = name.trim() || UNTITLED;
  return trimmed.toLowerCase().endsWith(".json") ? trimmed : `${trimmed}.json`;
}

export interface EditorState {
  catalogue: Catalogue | null;
  history: History<Graph>;
  runs: RunsState;
  issues: Record<string, Record<string, string[]>>;
  /** Identifies the graph on the canvas: new for each loaded workflow and for New, kept across edits
   *  and reloads. A run belongs to the graph it was submitted from. */
  graphId: string;
  /** Each node's state in this graph's current run (derived from `runs`). */
  nodeRuns: Record<string, NodeRunState>;
  /** Each node's newest picture from this graph's runs (derived from `runs`). */
  media: Record<string, NodeMedia>;
  message: { text: string; error: boolean } | null;
  connected: boolean;
  /** The name to save under (the toolbar's name box). */
  workflowName: string;
  /** The server's workflow file this graph was opened from or last saved to: saving to it asks nothing. */
  savedAs: string | null;
  /** A question the toolbar is asking: replace an existing file, or the name for Save As. */
  dialog: Dialog | null;
  savedWorkflows: string[];
  /** Bumped whenever a whole workflow is loaded, so the canvas fits it into view. */
  loads: number;
  /** The start-up work (catalogue, saved or default graph) is done. */
  ready: boolean;
  /** The node search box, when open. */
  search: SearchRequest | null;
  /** How often each node type appears in the server's saved workflows (ranks the search). */
  usage: Record<string, number>;
  /** A title to type over now (the context menu's Rename): the node or group id, and a count that changes per request. */
  renaming: { target: string; count: number } | null;
  /** The right-click menu, when open. */
  menu: ContextMenu | null;
  /** The image viewer, when open: a run's images (a batch), the one shown, and the run that made them. */
  viewer: { images: string[]; index: number; runId: string } | null;
  /** How many runs the Run button queues at once. */
  batchCount: number;
  /** What the history shows of each run beside its images: its prompt (the server's `prompt` of the run). */
  runInfo: Record<string, { prompt: string | null }>;
  /** The shortcut sheet is open. */
  showShortcuts: boolean;
  /** The minimap is shown (kept in local storage). */
  showMinimap: boolean;
  /** Every open tab, in order. The open one's entry (`activeTab`) is brought up to date from the live
   *  fields (history, graphId, workflowName, savedAs, viewport) when another opens or the tabs are stored. */
  tabs: Tab[];
  activeTab: number;
  /** Where the canvas looks (kept with the tab). */
  viewport?: Viewport;
  /** The open tab was changed before the page was reloaded (kept with the tab, see tabs.ts `edited`). */
  editedBefore: boolean;
}

function newGraphId(): string {
  return typeof crypto !== "undefined" && "randomUUID" in crypto ? crypto.randomUUID()
    : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** How many of the newest runs the queue panel reads from the server when it (re)connects. */
const RESYNC_RUNS = 50;
/** Events received while a resync reads the runs: applied again on top of what it read. */
let missed: ServerEvent[] | null = null;

/** run id -> id of the graph it was submitted from; kept in local storage so a reload still knows. */
const runGraphs = new Map<string, string>();

function loadRunGraphs(): void {
  try {
    const saved = JSON.parse(localStorage.getItem(RUN_GRAPHS_KEY) ?? "[]") as unknown;
    if (Array.isArray(saved)) for (const [run, graphId] of saved) runGraphs.set(String(run), String(graphId));
  } catch {
    // Unreadable or no storage: runs from before this page load are then shown as nobody's.
  }
}

function rememberRun(runId: string): void {
  runGraphs.set(runId, state.graphId);
  while (runGraphs.size > RUN_GRAPHS_KEPT) runGraphs.delete(runGraphs.keys().next().value as string);
  try {
    localStorage.setItem(RUN_GRAPHS_KEY, JSON.stringify([...runGraphs]));
  } catch {
    // As above: only this page then knows whose the run is.
  }
}

let state: EditorState = {
  catalogue: null,
  history: startHistory<Graph>(emptyGraph()),
  runs: emptyRuns,
  issues: {},
  graphId: newGraphId(),
  nodeRuns: {},
  media: {},
  message: null,
  connected: false,
  workflowName: UNTITLED,
  savedAs: null,
  dialog: null,
  savedWorkflows: [],
  loads: 0,
  ready: false,
  search: null,
  usage: {},
  renaming: null,
  menu: null,
  viewer: null,
  batchCount: 1,
  runInfo: {},
  showShortcuts: false,
  showMinimap: true,
  tabs: [],
  activeTab: 0,
  editedBefore: false,
};
export const MINIMAP_KEY = "nodegraph.minimap";
let searchSerial = 0;
/** Runs whose workflow was asked for (the history's prompts), answered or not yet. */
const runInfoAsked = new Set<string>();
export const MAX_BATCH = 100;
const listeners = new Set<() => void>();
let clipboard: Snippet | null = null;

/** The canvas's view of the runs submitted from the graph on it. */
function runView(current: EditorState): Pick<EditorState, "nodeRuns" | "media"> {
  const view = graphRunView(current.runs, (runId) => runGraphs.get(runId) === current.graphId, current.media);
  return { nodeRuns: view.nodes, media: view.media };
}

function set(change: Partial<EditorState>): void {
  const before = state;
  state = { ...state, ...change };
  if (state.runs !== before.runs || state.graphId !== before.graphId) state = { ...state, ...runView(state) };
  if (state.history.present !== before.history.present || state.workflowName !== before.workflowName
      || state.savedAs !== before.savedAs || state.graphId !== before.graphId || state.tabs !== before.tabs) persist();
  for (const listener of listeners) listener();
}

/** The open tab as its live fields say. */
function liveTab(): Tab {
  const tab: Tab = { graphId: state.graphId, workflowName: state.workflowName, savedAs: state.savedAs, history: state.history };
  if (state.viewport) tab.viewport = state.viewport;
  if (state.editedBefore) tab.editedBefore = true;
  return tab;
}

/** Every tab, the open one up to date. */
function currentTabs(): Tab[] {
  const tabs = [...state.tabs];
  tabs[Math.min(state.activeTab, tabs.length)] = liveTab();
  return tabs;
}

/** The tabs open before the page was (re)loaded, from local storage: each graph with a new undo
 *  history, the same graph id (its runs are still its own). False if there are none. */
function restoreTabs(): boolean {
  let stored: { active: string; tabs: StoredTab[] } | null = null;
  try {
    stored = readStoredTabs(localStorage.getItem(TABS_KEY));
    if (stored === null) {
      // Stored by an editor without tabs: its one graph.
      const single = localStorage.getItem(SAVED_GRAPH_KEY);
      const one = single === null ? null : JSON.parse(single) as StoredTab;
      if (one !== null && typeof one.graphId === "string") stored = { active: one.graphId, tabs: [one] };
    }
  } catch {
    stored = null;  // unreadable: start from the default workflow instead
  }
  if (stored === null) return false;
  const tabs: Tab[] = [];
  for (const saved of stored.tabs) {
    try {
      const read = workflowToGraph(saved.workflow);
      const graph = state.catalogue === null ? read : withDefaults(read, state.catalogue);
      tabs.push({ graphId: saved.graphId, workflowName: saved.name, savedAs: typeof saved.savedAs === "string" ? saved.savedAs : null,
                  history: startHistory(graph), editedBefore: saved.edited === true });
    } catch (error) {
      say(`a tab could not be reopened (${saved.name}): ${(error as Error).message}`, true);
    }
  }
  if (tabs.length === 0) return false;
  const active = Math.max(0, tabs.findIndex((tab) => tab.graphId === stored.active));
  set({ tabs, activeTab: active, ...opened(tabs[active]), loads: state.loads + 1 });
  return true;
}

/** The fields that make `tab` the open one. */
function opened(tab: Tab): Partial<EditorState> {
  typing = null;
  gesture = false;
  return { graphId: tab.graphId, workflowName: tab.workflowName, savedAs: tab.savedAs, history: tab.history,
           viewport: tab.viewport, editedBefore: tab.editedBefore === true, issues: {} };
}

function persist(): void {
  try {
    const active = storedTab(liveTab());
    localStorage.setItem(SAVED_GRAPH_KEY, JSON.stringify(active));
    localStorage.setItem(TABS_KEY, JSON.stringify({ active: state.graphId, tabs: currentTabs().map(storedTab) }));
  } catch {
    // Storage full or disabled: the graphs still live in the page; nothing else depends on them.
  }
}

/** The drawn width of a node (styles.css .graph-node). */
export const NODE_WIDTH = 240;

/** The graph with a new node of `type` at `position` (or beside a node already there), selected alone. */
function withNewNode(base: Graph, type: string, position: { x: number; y: number }): { graph: Graph; id: string } | null {
  const spec = state.catalogue?.nodes[type];
  if (spec === undefined) return null;
  const id = newNodeId(type, new Set(base.nodes.map((n) => n.id)));
  const node = { ...createNode(spec, id, freeSpot(base, position)), selected: true };
  return { id, graph: { ...base, nodes: [...base.nodes.map((n) => ({ ...n, selected: false })), node] } };
}

/** Whether a run submitted from graph `graphId` is queued or running (a tab shows it). */
export function graphBusy(current: EditorState, graphId: string): boolean {
  return Object.values(current.runs.runs).some((run) => (run.status === "queued" || run.status === "running")
                                                        && runGraphs.get(run.id) === graphId);
}

export function getState(): EditorState {
  return state;
}

export function subscribe(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function useEditor<T>(select: (state: EditorState) => T): T {
  return useSyncExternalStore(subscribe, () => select(state));
}

const graph = () => state.history.present;
/** A drag or resize under way: its moves after the first join the undo step its start recorded. */
let gesture = false;
/** The input being typed into ("node\u0000input"): its further changes join the same undo step. */
let typing: string | null = null;

function commit(next: Graph): void {
  typing = null;
  set({ history: record(state.history, next), issues: {} });
}

/** How long the toolbar shows news, and an error (longer: it may need reading twice). Clicking dismisses either. */
export const MESSAGE_MS = { news: 6000, error: 20_000 };
let messageTimer: ReturnType<typeof setTimeout> | undefined;

function say(text: string, error = false): void {
  clearTimeout(messageTimer);
  set({ message: { text, error } });
  messageTimer = setTimeout(() => set({ message: null }), error ? MESSAGE_MS.error : MESSAGE_MS.news);
}

function selectedIds(): { nodes: Set<string>; edges: Set<string> } {
  return { nodes: new Set(graph().nodes.filter((n) => n.selected).map((n) => n.id)),
           edges: new Set(graph().edges.filter((e) => e.selected).map((e) => e.id)) };
}

async function writeWorkflow(fileName: string): Promise<void> {
  try {
    await api.saveWorkflow(fileName, graphToWorkflow(graph()));
    set({ workflowName: fileName, savedAs: fileName });
    say(`saved ${fileName}`);
    await actions.refreshWorkflows();
  } catch (error) {
    say(`cannot save ${fileName}: ${(error as Error).message}`, true);
  }
}

/** For the action modules beside the store (canvasActions.ts): the graph on the canvas, an undoable
 *  change to it, the toolbar message and the selection. */
export const editing = {
  graph: (): Graph => graph(),
  commit: (next: Graph): void => commit(next),
  say: (text: string, error = false): void => say(text, error),
  selected: selectedIds,
};

export const actions = {
  async start(): Promise<void> {
    await actions.loadInitialGraph();
    set({ ready: true });
  },

  async loadInitialGraph(): Promise<void> {
    try {
      actions.setCatalogue(await api.catalogue());
    } catch (error) {
      say(`cannot load the node catalogue: ${(error as Error).message}`, true);
      return;
    }
    await actions.refreshWorkflows();
    void actions.learnUsage();
    loadRunGraphs();
    set({ showMinimap: localStorage.getItem(MINIMAP_KEY) !== "hidden" });
    if (restoreTabs()) return;
    if (state.savedWorkflows.includes(DEFAULT_WORKFLOW)) await actions.openSaved(DEFAULT_WORKFLOW);
  },

  setCatalogue(catalogue: Catalogue): void {
    state = { ...state, catalogue };
    set({ history: replace(state.history, withDefaults(graph(), catalogue)) });
  },

  async refreshWorkflows(): Promise<void> {
    try {
      const { workflows } = await api.workflows();
      set({ savedWorkflows: workflows.map((w) => w.name) });
    } catch (error) {
      say(`cannot list saved workflows: ${(error as Error).message}`, true);
    }
  },

  /** Count the node types of the server's saved workflows, for the search's ranking. A workflow that
   *  cannot be read is left out of the count (it only orders the search). */
  async learnUsage(): Promise<void> {
    const read = await Promise.all(state.savedWorkflows.map((name) => api.workflow(name).catch((error: Error) => {
      console.warn(`node search: cannot read ${name} (${error.message}); its nodes are not counted`);
      return null;
    })));
    set({ usage: nodeUsage(read) });
  },

  event(event: ServerEvent): void {
    missed?.push(event);
    set({ runs: applyEvent(state.runs, event) });
  },

  /** The event stream opened or closed. On opening (the page's first, or after a drop) the runs are
   *  read from the server, since events sent while this page was not listening are not replayed. */
  async setConnected(connected: boolean): Promise<void> {
    set({ connected });
    if (connected) await actions.resync();
  },

  /** Read every recent run, and the live state of running ones, from the API; events arriving
   *  meanwhile are applied again on top (applying one twice changes nothing). */
  async resync(): Promise<void> {
    const arriving: ServerEvent[] = [];
    missed = arriving;
    try {
      loadRunGraphs();
      const list = await api.runs(RESYNC_RUNS);
      const live = await Promise.all(list.runs.filter((run) => run.status === "running").map((run) => api.run(run.id)));
      const prompts = Object.fromEntries(list.runs.map((run) => [run.id, { prompt: run.prompt ?? null }]));
      if (missed === arriving) {
        set({ runs: arriving.reduce(applyEvent, runsFromApi(list, live)), runInfo: { ...state.runInfo, ...prompts } });
      }
    } catch (error) {
      say(`cannot read the runs: ${(error as Error).message}`, true);
    } finally {
      if (missed === arriving) missed = null;
    }
  },

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
    set({ history: undoable ? record(state.history, next) : replace(state.history, next) });
  },

  edgesChanged(changes: EdgeChange<GraphEdge>[]): void {
    const next = pruneReroutes({ ...graph(), edges: applyEdgeChanges(changes, graph().edges) as GraphEdge[] });
    const undoable = changes.some((c) => c.type === "remove");
    if (undoable) typing = null;
    set({ history: undoable ? record(state.history, next) : replace(state.history, next) });
  },

  canConnect(connection: Connection): boolean {
    return state.catalogue !== null && connectionProblem(state.catalogue, graph(), connection) === null;
  },

  connect(connection: Connection): void {
    if (state.catalogue === null) return;
    const problem = connectionProblem(state.catalogue, graph(), connection);
    if (problem !== null) {
      say(`cannot connect: ${problem}`, true);
      return;
    }
    commit(connect(graph(), connection));
  },

  /** Move a link pulled off its input to another input: one undo step. */
  moveLink(edge: GraphEdge, connection: Connection): void {
    if (state.catalogue === null) return;
    const without = removeItems(graph(), new Set(), new Set([edge.id]));
    const problem = connectionProblem(state.catalogue, without, connection);
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
    const catalogue = state.catalogue;
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
    if (state.catalogue === null) return;
    const problem = sameKind ? "a link goes from an output to an input"
      : connectionProblem(state.catalogue, graph(), connection);
    if (problem !== null) say(`cannot connect: ${problem}`, true);
  },

  /** Add a node of `type` at `position`, or beside it if a node sits there already; it is selected. */
  addNode(type: string, position: { x: number; y: number }): string | null {
    const added = withNewNode(graph(), type, position);
    if (added === null) return null;
    commit(added.graph);
    return added.id;
  },

  /** Start typing over the title of a node (or "group:<id>"). */
  startRenaming(target: string): void {
    set({ renaming: { target, count: (state.renaming?.count ?? 0) + 1 } });
  },

  openSearch(request: SearchRequest): void {
    searchSerial += 1;
    set({ search: { ...request, serial: searchSerial }, menu: null });
  },

  /** Close the search without choosing. A link pulled off an input for it stays off. */
  closeSearch(): void {
    const link = state.search?.link;
    set({ search: null });
    if (link?.replaces !== undefined) commit(removeItems(graph(), new Set(), new Set([link.replaces])));
  },

  /** Add the node chosen in the search where it was opened; with a dragged link, joined by it (the new
   *  node placed so the socket is near where the link was let go), and its other required link inputs
   *  linked where only one output fits. One undo step. */
  addFromSearch(type: string, socket?: string): string | null {
    const search = state.search;
    if (search === null || state.catalogue === null) return null;
    const link = search.link;
    const at = link?.from === "input" ? { x: search.at.x - NODE_WIDTH, y: search.at.y - 20 } : { x: search.at.x, y: search.at.y - 20 };
    let base = graph();
    if (link?.replaces !== undefined) base = removeItems(base, new Set(), new Set([link.replaces]));
    const added = withNewNode(base, type, at);
    if (added === null) return null;
    let next = added.graph;
    if (link !== undefined && socket !== undefined) {
      const connection = link.from === "output"
        ? { source: link.nodeId, sourceHandle: link.socket, target: added.id, targetHandle: socket }
        : { source: added.id, sourceHandle: socket, target: link.nodeId, targetHandle: link.socket };
      if (connectionProblem(state.catalogue, next, connection) === null) next = connect(next, connection);
    }
    const filled = linkUnambiguousInputs(state.catalogue, next, added.id);
    set({ search: null });
    commit(filled.graph);
    if (filled.linked.length > 0) {
      say(`linked ${filled.linked.map((l) => `${l.targetHandle} from ${l.source}`).join(", ")} (the only fitting outputs)`);
    }
    return added.id;
  },

  /** Set a literal input. Changes to the same input one after another are one undo step (a prompt
   *  typed letter by letter), until `finishTyping` (the field is left) or any other edit. */
  setValue(nodeId: string, input: string, value: unknown): void {
    const next = { ...graph(), nodes: graph().nodes.map((node) => node.id !== nodeId ? node
      : { ...node, data: { ...node.data, values: { ...node.data.values, [input]: value } } }) };
    const key = `${nodeId}\u0000${input}`;
    if (typing === key) {
      set({ history: replace(state.history, next), issues: {} });
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
      if (hasOverlaps(graph(), sizes)) set({ history: replace(state.history, arrange(graph(), sizes)) });
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
    set({ history: replace(state.history, {
      ...g, nodes: g.nodes.map((n) => ({ ...n, selected: chosen.has(n.id) })), edges: g.edges.map((e) => ({ ...e, selected: false })),
      groups: g.groups.map((x) => ({ ...x, selected: false })), notes: g.notes.map((x) => ({ ...x, selected: false })),
      reroutes: g.reroutes.map((x) => ({ ...x, selected: false })),
    }) });
  },

  /** Select every node, group, note and reroute point (Ctrl+A). */
  selectAll(): void {
    const g = graph();
    set({ history: replace(state.history, {
      ...g, nodes: g.nodes.map((n) => ({ ...n, selected: true })), groups: g.groups.map((x) => ({ ...x, selected: true })),
      notes: g.notes.map((x) => ({ ...x, selected: true })), reroutes: g.reroutes.map((x) => ({ ...x, selected: true })),
    }) });
  },

  /** Show images large, starting at `index`; `runId`: the run that made them. */
  openViewer(images: string[], index: number, runId: string): void {
    if (images.length > 0) set({ viewer: { images, index: Math.max(0, Math.min(index, images.length - 1)), runId } });
  },

  /** Step through the viewer's images (wrapping around). */
  stepViewer(delta: number): void {
    const viewer = state.viewer;
    if (viewer === null) return;
    const count = viewer.images.length;
    set({ viewer: { ...viewer, index: (viewer.index + delta + count) % count } });
  },

  closeViewer(): void {
    set({ viewer: null });
  },

  /** Open the workflow a run was submitted with (GET /api/runs/{id}) in a new tab (in the open one only
   *  if it is blank), so that it never replaces work, saved or not. */
  async openRunWorkflow(runId: string): Promise<void> {
    try {
      const run = await api.run(runId);
      if (typeof run.workflow !== "object" || run.workflow === null) throw new Error("the server sent no workflow for it");
      const tabs = currentTabs().length;
      actions.load(run.workflow, `run-${runId.slice(0, 8)}.json`, true);
      set({ viewer: null });
      say(`opened the workflow of run ${runId.slice(0, 8)}${state.tabs.length > tabs ? " in a new tab" : ""}`);
    } catch (error) {
      say(`cannot open the workflow of run ${runId.slice(0, 8)}: ${(error as Error).message}`, true);
    }
  },

  openMenu(menu: ContextMenu): void {
    set({ menu });
  },

  closeMenu(): void {
    if (state.menu !== null) set({ menu: null });
  },

  undo(): void {
    typing = null;
    set({ history: undo(state.history) });
  },

  redo(): void {
    typing = null;
    set({ history: redo(state.history) });
  },

  /** Open a workflow document in a new tab, or in the open one if it is unchanged since it was opened
   *  and has submitted no run (with `newTab`: only if it is blank). Not an undo step: the graph starts
   *  a new history. */
  load(document: unknown, name: string, newTab = false): void {
    const read = workflowToGraph(document);
    const graph = state.catalogue === null ? read : withDefaults(read, state.catalogue);
    const tab: Tab = { graphId: newGraphId(), workflowName: name, savedAs: null, history: startHistory(graph) };
    const current = liveTab();
    const keep = newTab ? !blank(current)
      : edited(current) || current.history.future.length > 0 || [...runGraphs.values()].includes(current.graphId);
    const tabs = currentTabs();
    const activeTab = keep ? tabs.length : state.activeTab;
    tabs[activeTab] = tab;
    set({ tabs, activeTab, ...opened(tab), loads: state.loads + 1 });
  },

  /** Open a new, empty tab. */
  newTab(): void {
    const tabs = currentTabs();
    const tab: Tab = { graphId: newGraphId(), workflowName: UNTITLED, savedAs: null, history: startHistory(emptyGraph()) };
    set({ tabs: [...tabs, tab], activeTab: tabs.length, ...opened(tab) });
  },

  switchTab(index: number): void {
    if (index === state.activeTab || index < 0 || index >= state.tabs.length) return;
    const tabs = currentTabs();
    // A tab never looked at since the page loaded is fitted into view once it is drawn.
    set({ tabs, activeTab: index, ...opened(tabs[index]), ...(tabs[index].viewport ? {} : { loads: state.loads + 1 }) });
  },

  /** Close a tab (its runs stay in the history); the last one closed leaves an empty tab. */
  closeTab(index: number): void {
    const tabs = currentTabs();
    const closing = tabs[index];
    if (closing === undefined) return;
    if (tabs.length === 1) {
      actions.newTab();
      set({ tabs: [state.tabs[1]], activeTab: 0 });
      return;
    }
    const rest = tabs.filter((_, i) => i !== index);
    if (index !== state.activeTab) {
      set({ tabs: rest, activeTab: state.activeTab - (index < state.activeTab ? 1 : 0) });
      return;
    }
    const next = neighbourOf(tabs, closing.graphId) as Tab;
    const activeTab = rest.indexOf(next);
    set({ tabs: rest, activeTab, ...opened(next) });
  },

  /** Where the canvas looks now (kept with the tab). */
  rememberViewport(viewport: Viewport): void {
    state = { ...state, viewport };
  },

  async openSaved(name: string): Promise<void> {
    try {
      actions.load(await api.workflow(name), name);
      set({ savedAs: name });
      say(`opened ${name}`);
    } catch (error) {
      say(`cannot open ${name}: ${(error as Error).message}`, true);
    }
  },

  /** Change the name to save under. */
  rename(name: string): void {
    set({ workflowName: name });
  },

  /** Save under `name` in the server's workflows folder. Replacing a file other than the one this
   *  graph came from (or was last saved to) is asked first (see `dialog`). */
  async saveToServer(name: string): Promise<void> {
    const fileName = workflowFileName(name);
    set({ workflowName: fileName });
    await actions.refreshWorkflows();  // another tab or person may have saved one since
    if (fileName !== state.savedAs && state.savedWorkflows.includes(fileName)) {
      set({ dialog: { kind: "overwrite", name: fileName } });
      return;
    }
    await writeWorkflow(fileName);
  },

  /** Ask for a name to save under. */
  saveAs(): void {
    set({ dialog: { kind: "saveAs", name: workflowFileName(state.workflowName) } });
  },

  /** Answer the dialog with yes (for Save As, with the name chosen). */
  async confirmDialog(name?: string): Promise<void> {
    const dialog = state.dialog;
    set({ dialog: null });
    if (dialog?.kind === "overwrite") await writeWorkflow(dialog.name);
    else if (dialog?.kind === "saveAs") await actions.saveToServer(name ?? dialog.name);
  },

  closeDialog(): void {
    set({ dialog: null });
  },

  /** Clear the canvas for a new graph, without a name. Undoable: a slip loses nothing. */
  newGraph(): void {
    commit(emptyGraph());
    set({ workflowName: UNTITLED, savedAs: null, graphId: newGraphId() });
  },

  /** Open a dropped or chosen file: a workflow JSON, a foreign format the server converts, or a nodegraph PNG. */
  async openFile(file: File): Promise<void> {
    try {
      const bytes = new Uint8Array(await file.arrayBuffer());
      let document: unknown;
      if (file.type === "image/png" || file.name.toLowerCase().endsWith(".png")) {
        document = workflowFromPng(bytes);
      } else {
        document = JSON.parse(new TextDecoder().decode(bytes));
      }
      const native = typeof document === "object" && document !== null && "nodes" in document
        && typeof (document as { nodes: unknown }).nodes === "object" && !Array.isArray((document as { nodes: unknown }).nodes);
      if (!native) {
        const converted = await api.convert(document);
        const extras = state.catalogue && comfyEditorExtras(document, converted.workflow, state.catalogue);
        document = extras ? withRandomizedSeeds(converted.workflow, extras.randomized) : converted.workflow;
        const dropped = extras ? leftOut(extras) : null;
        const imported = `imported ${file.name} (${converted.importer ?? "converted"})`;
        // Something of the file is not kept: said as a warning, which stays up longer.
        if (dropped) say(`${imported}; left out: ${dropped} (the server's importer did not convert them)`, true);
        else say(imported);
      } else {
        say(`opened ${file.name}`);
      }
      actions.load(document, file.name.replace(/\.png$/i, ".json"));  // not the server's file: saving asks
    } catch (error) {
      say(`cannot open ${file.name}: ${(error as Error).message}`, true);
    }
  },

  async uploadImage(nodeId: string, input: string, file: File): Promise<void> {
    try {
      const uploaded = await api.upload(file);
      set({ catalogue: await api.catalogue() });  // the inputs folder's choices now include it
      actions.setValue(nodeId, input, uploaded.name);
      say(`uploaded ${uploaded.name}`);
    } catch (error) {
      say(`upload failed: ${(error as Error).message}`, true);
    }
  },

  /** Queue the graph `batchCount` times (seeds marked random get new values between the runs). */
  async run(): Promise<void> {
    const ids: string[] = [];
    try {
      for (let i = 0; i < state.batchCount; i++) {
        const { id } = await api.submit(graphToWorkflow(graph()));
        ids.push(id);
        rememberRun(id);
        // Its events may have come first: shown now it is known as ours.
        set({ issues: {}, ...runView(state) });
        actions.randomizeSeeds();
      }
      say(ids.length === 1 ? `queued run ${ids[0].slice(0, 8)}` : `queued ${ids.length} runs`);
    } catch (error) {
      if (ids.length > 0) say(`queued ${ids.length} of ${state.batchCount} runs`, true);
      if (error instanceof ApiError && error.issues.length > 0) {
        set({ issues: issuesByNode(error.issues) });
        say(`not run: ${error.issues.map((i) => i.message).join("; ")}`, true);
      } else {
        say(`cannot run: ${(error as Error).message}`, true);
      }
    }
  },

  toggleShortcuts(): void {
    set({ showShortcuts: !state.showShortcuts });
  },

  /** Show or hide the minimap; the choice is kept for the next visit. */
  toggleMinimap(): void {
    const show = !state.showMinimap;
    set({ showMinimap: show });
    try {
      localStorage.setItem(MINIMAP_KEY, show ? "shown" : "hidden");
    } catch {
      // No storage: the choice holds for this page only.
    }
  },

  /** How many runs the Run button queues at once. */
  setBatchCount(count: number): void {
    if (Number.isInteger(count) && count >= 1 && count <= MAX_BATCH) set({ batchCount: count });
  },

  /** Read the prompt of each listed run not known yet: from the list of the newest runs (one request,
   *  no workflows), else from the run itself (GET /api/runs/{id}) for an older one. */
  async loadRunInfo(ids: string[]): Promise<void> {
    const wanted = ids.filter((id) => !(id in state.runInfo) && !runInfoAsked.has(id));
    if (wanted.length === 0) return;
    for (const id of wanted) runInfoAsked.add(id);
    const found: Record<string, { prompt: string | null }> = {};
    try {
      for (const run of (await api.runs(RESYNC_RUNS)).runs) {
        if (wanted.includes(run.id)) found[run.id] = { prompt: run.prompt ?? null };
      }
    } catch (error) {
      console.warn(`history: cannot list the runs (${(error as Error).message}); reading them one by one`);
    }
    await Promise.all(wanted.filter((id) => !(id in found)).map(async (id) => {
      try {
        found[id] = { prompt: (await api.run(id)).prompt ?? null };
      } catch (error) {
        console.warn(`history: cannot read run ${id} (${(error as Error).message})`);
        runInfoAsked.delete(id);  // asked again next time the list is drawn
      }
    }));
    if (Object.keys(found).length > 0) set({ runInfo: { ...state.runInfo, ...found } });
  },

  /** Delete a finished run from the server's history (DELETE /api/runs/{id}; its files stay). It leaves
   *  the list now, and on every other page by the `run_deleted` event; a refusal (a run not finished)
   *  is said with the server's reason. */
  async deleteRun(id: string): Promise<void> {
    try {
      await api.deleteRun(id);
      set({ runs: withoutRun(state.runs, id) });
    } catch (error) {
      say(`cannot delete run ${id.slice(0, 8)}: ${(error as Error).message}`, true);
    }
  },

  randomizeSeeds(): void {
    const catalogue = state.catalogue;
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

  notify(text: string, error = false): void {
    say(text, error);
  },

  dismissMessage(): void {
    clearTimeout(messageTimer);
    set({ message: null });
  },
};
