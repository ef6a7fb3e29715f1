// The editor's one state: its shape, the cell that holds it, and how it changes (set) and is read
// (getState, useEditor). The action modules beside it change it; components read it.

import { useSyncExternalStore } from "react";

import type { Catalogue } from "./catalogue";
import { emptyGraph, type Graph } from "./graph";
import { type History, startHistory } from "./history";
import type { LinkFilter } from "./nodeSearch";
import { graphOfRun } from "./runGraphs";
import { emptyRuns, graphRunView, type NodeMedia, type NodeRunState, type RunsState } from "./runState";
import type { Tab } from "./tabs";
import type { Viewport } from "./viewport";

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

export function newGraphId(): string {
  return typeof crypto !== "undefined" && "randomUUID" in crypto ? crypto.randomUUID()
    : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
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
const listeners = new Set<() => void>();

/** The canvas's view of the runs submitted from the graph on it. */
export function runView(current: EditorState): Pick<EditorState, "nodeRuns" | "media"> {
  const view = graphRunView(current.runs, (runId) => graphOfRun(runId) === current.graphId, current.media);
  return { nodeRuns: view.nodes, media: view.media };
}

/** Change the state and tell every listener (the runs' view of the graph follows the runs and the graph). */
export function set(change: Partial<EditorState>): void {
  const before = state;
  state = { ...state, ...change };
  if (state.runs !== before.runs || state.graphId !== before.graphId) state = { ...state, ...runView(state) };
  for (const listener of listeners) listener();
}

/** Change the state without telling anyone: for what the page already shows (where the canvas looks). */
export function setQuietly(change: Partial<EditorState>): void {
  state = { ...state, ...change };
}

export function getState(): EditorState {
  return state;
}

/** The graph on the canvas. */
export function currentGraph(): Graph {
  return state.history.present;
}

export function subscribe(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function useEditor<T>(select: (state: EditorState) => T): T {
  return useSyncExternalStore(subscribe, () => select(state));
}
