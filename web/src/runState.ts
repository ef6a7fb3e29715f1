// What the editor shows about runs, folded from the server's WebSocket events (docs/api.md).

export type NodeStatus = "pending" | "running" | "cached" | "executed" | "failed" | "cancelled";
export type RunStatus = "queued" | "running" | "succeeded" | "failed" | "cancelled" | "interrupted";

export interface NodeRunState {
  status: NodeStatus;
  progress?: [number, number];
  preview?: string;
  images: string[];
  error?: string;
}

export interface RunView {
  id: string;
  status: RunStatus;
  nodes: Record<string, NodeRunState>;
  currentNode: string | null;
  images: string[];
  error?: string;
  seconds?: number;
  /** When it was queued and when it ended (Unix seconds), where known. */
  created?: number;
  finished?: number;
}

export interface QueueState {
  queued: string[];
  running: string | null;
  paused: boolean;
}

export interface RunsState {
  runs: Record<string, RunView>;
  /** Run ids, oldest first. */
  order: string[];
  queue: QueueState;
}

export interface ServerEvent {
  type: string;
  run_id: string;
  node_id: string | null;
  [field: string]: unknown;
}

export const emptyRuns: RunsState = { runs: {}, order: [], queue: { queued: [], running: null, paused: false } };

const IMAGE_URL = /\.(png|jpe?g|webp|gif|bmp)$/i;

export function imageUrls(urls: unknown): string[] {
  if (!Array.isArray(urls)) return [];
  return urls.filter((url): url is string => typeof url === "string" && IMAGE_URL.test(url));
}

function withRun(state: RunsState, id: string, change: (run: RunView) => RunView): RunsState {
  const known = state.runs[id];
  const run = known ?? { id, status: "queued", nodes: {}, currentNode: null, images: [] };
  return {
    ...state,
    runs: { ...state.runs, [id]: change(run) },
    order: known ? state.order : [...state.order, id],
  };
}

/** The state without a run (deleted from the server's history, by this page or another client). */
export function withoutRun(state: RunsState, id: string): RunsState {
  if (!(id in state.runs)) return state;
  const { [id]: _deleted, ...runs } = state.runs;
  return { ...state, runs, order: state.order.filter((known) => known !== id) };
}

/** A node's events mean its run is under way, even if the page saw neither its start nor its queueing. */
function underWay(run: RunView): RunView {
  return run.status === "queued" ? { ...run, status: "running" } : run;
}

function withNode(run: RunView, nodeId: string, change: (node: NodeRunState) => NodeRunState): RunView {
  const node = run.nodes[nodeId] ?? { status: "pending", images: [] };
  return { ...run, nodes: { ...run.nodes, [nodeId]: change(node) } };
}

/** `{[field]: event.time}` when the event carries its time (every server event does). */
function at(field: "created" | "finished", event: ServerEvent): Partial<RunView> {
  return typeof event.time === "number" ? { [field]: event.time } : {};
}

/** The state after one server event. Unknown event types change nothing. */
export function applyEvent(state: RunsState, event: ServerEvent): RunsState {
  const nodeId = event.node_id;
  switch (event.type) {
    case "queue_changed": {
      const running = event.running as string | null;
      const next = { ...state, queue: { queued: event.queued as string[], running, paused: event.paused as boolean } };
      return running ? withRun(next, running, underWay) : next;
    }
    case "run_queued":
      return withRun(state, event.run_id, (run) => ({ ...run, status: "queued", ...at("created", event) }));
    case "run_started":
      return withRun(state, event.run_id, (run) => {
        const nodes: Record<string, NodeRunState> = {};
        for (const id of event.nodes as string[]) nodes[id] = { status: "pending", images: [] };
        return { ...run, status: "running", nodes };
      });
    case "node_started":
      return withRun(state, event.run_id, (run) => ({
        ...withNode(underWay(run), nodeId as string, (node) => ({ ...node, status: "running" })), currentNode: nodeId }));
    case "node_progress":
      return withRun(state, event.run_id, (run) => ({
        ...withNode(underWay(run), nodeId as string, (node) => ({
          ...node, status: "running", progress: [event.value as number, event.max as number] })),
        currentNode: nodeId }));
    case "node_preview":
      return withRun(state, event.run_id, (run) => withNode(underWay(run), nodeId as string, (node) => ({
        ...node, preview: event.image as string })));
    case "node_cached":
    case "node_finished": {
      const images = imageUrls(event.file_urls);
      const status: NodeStatus = event.type === "node_cached" ? "cached" : "executed";
      return withRun(state, event.run_id, (run) => ({
        ...withNode(run, nodeId as string, (node) => ({ ...node, status, images })),
        currentNode: run.currentNode === nodeId ? null : run.currentNode,
        images: [...run.images, ...images.filter((url) => !run.images.includes(url))],  // an event seen twice (resync)
      }));
    }
    case "node_failed":
      return withRun(state, event.run_id, (run) => withNode(run, nodeId as string, (node) => ({
        ...node, status: "failed", error: `${event.exception}: ${event.message}` })));
    case "run_finished":
      return withRun(state, event.run_id, (run) => ({ ...run, status: "succeeded", currentNode: null,
                                                      seconds: event.seconds as number, ...at("finished", event) }));
    case "run_failed":
      return withRun(state, event.run_id, (run) => ({ ...run, status: "failed", currentNode: null,
                                                      error: runErrorText(event.error), ...at("finished", event) }));
    case "run_deleted":
      return withoutRun(state, event.run_id);
    case "run_cancelled":
      return withRun(state, event.run_id, (run) => {
        const nodes = Object.fromEntries(Object.entries(run.nodes).map(([id, node]) =>
          [id, node.status === "running" ? { ...node, status: "cancelled" as NodeStatus } : node]));
        return { ...run, status: "cancelled", currentNode: null, nodes, ...at("finished", event) };
      });
    default:
      return state;
  }
}

/** A failed run's error (event `run_failed` or the API's run `error`) in one line. */
export function runErrorText(error: unknown): string {
  if (typeof error !== "object" || error === null) return "failed";
  const { node_id, exception, message, issues } = error as
    { node_id?: string; exception?: string; message?: string; issues?: Issue[] };
  if (Array.isArray(issues) && issues.length > 0) return issues.map((issue) => issue.message).join("; ");
  return `${node_id ?? ""}: ${exception ?? ""} ${message ?? ""}`.trim();
}

/** A run as GET /api/runs and GET /api/runs/{id} describe it (docs/api.md). */
export interface ApiRun {
  id: string;
  status: RunStatus;
  nodes?: Record<string, { status: NodeStatus; progress?: [number, number]; file_urls?: (string | null)[] }>;
  file_urls?: (string | null)[];
  error?: unknown;
  seconds?: number | null;
  /** Unix seconds. */
  created?: number;
  finished?: number | null;
  /** The workflow it ran (GET /api/runs/{id} only). */
  workflow?: unknown;
  /** Its prompt: the first non-empty multi-line text of its workflow, or null (docs/api.md). */
  prompt?: string | null;
}

/** GET /api/runs: the runs, oldest first, and the queue. */
export interface ApiRunList {
  runs: ApiRun[];
  queued: string[];
  running: string | null;
  paused: boolean;
}

/** The view of a run read from the API (when events were missed: a reload, a dropped stream). */
export function runFromApi(run: ApiRun): RunView {
  const nodes: Record<string, NodeRunState> = {};
  let currentNode: string | null = null;
  for (const [id, node] of Object.entries(run.nodes ?? {})) {
    nodes[id] = { status: node.status, images: imageUrls(node.file_urls) };
    if (node.progress) nodes[id].progress = node.progress;
    if (node.status === "running") currentNode = id;
  }
  const images = imageUrls(run.file_urls);
  const view: RunView = { id: run.id, status: run.status, nodes, currentNode: run.status === "running" ? currentNode : null,
                          images: images.length > 0 ? images : Object.values(nodes).flatMap((node) => node.images) };
  if (run.status === "failed") view.error = runErrorText(run.error);
  if (typeof run.seconds === "number") view.seconds = run.seconds;
  if (typeof run.created === "number") view.created = run.created;
  if (typeof run.finished === "number") view.finished = run.finished;
  return view;
}

/** The run state read from the API: `list` (GET /api/runs) with the live state of its running runs. */
export function runsFromApi(list: ApiRunList, live: ApiRun[]): RunsState {
  const runs: Record<string, RunView> = {};
  for (const run of list.runs) runs[run.id] = runFromApi(run);
  for (const run of live) runs[run.id] = runFromApi(run);
  return { runs, order: list.runs.map((run) => run.id),
           queue: { queued: list.queued, running: list.running, paused: list.paused } };
}

/** A run's progress from 0 to 1: finished nodes plus the running node's share of its steps. */
export function runProgress(run: RunView): number {
  if (run.status === "succeeded") return 1;
  const nodes = Object.values(run.nodes);
  if (nodes.length === 0) return 0;
  let done = 0;
  for (const node of nodes) {
    if (node.status === "executed" || node.status === "cached") done += 1;
    else if (node.status === "running" && node.progress && node.progress[1] > 0) done += node.progress[0] / node.progress[1];
  }
  return done / nodes.length;
}

export interface NodeMedia {
  src: string;
  kind: "preview" | "image";
  /** The run that made it. */
  runId: string;
  /** For an image: all the images the node made in that run (a batch), `src` the last. */
  images?: string[];
}

/** What the canvas shows of its own runs. */
export interface GraphRunView {
  /** Each node's state in the graph's running run, else in its latest run. */
  nodes: Record<string, NodeRunState>;
  /** Each node's newest picture from the graph's runs: the last image it made, else its last step preview. */
  media: Record<string, NodeMedia>;
}

const NO_NODES: Record<string, NodeRunState> = {};

/** The canvas's view of the runs that `owned` says were submitted from its graph (the queue panel
 *  lists every run; the canvas only its own). Media entries equal to `previous` ones are reused. */
export function graphRunView(runs: RunsState, owned: (runId: string) => boolean,
                             previous: Record<string, NodeMedia> = {}): GraphRunView {
  const own = runs.order.filter(owned);
  const current = own.filter((id) => runs.runs[id].status === "running").at(-1) ?? own.at(-1);
  const media: Record<string, NodeMedia> = {};
  for (const runId of [...own].reverse()) {
    for (const [nodeId, node] of Object.entries(runs.runs[runId].nodes)) {
      if (nodeId in media) continue;
      const image = node.images.at(-1);
      const found: NodeMedia | null = image !== undefined ? { src: image, kind: "image", runId, images: node.images }
        : node.preview !== undefined ? { src: node.preview, kind: "preview", runId } : null;
      if (found === null) continue;
      const before = previous[nodeId];
      const same = before?.src === found.src && before.kind === found.kind && before.runId === found.runId
        && before.images?.length === found.images?.length;
      media[nodeId] = same ? before : found;
    }
  }
  return { nodes: current === undefined ? NO_NODES : runs.runs[current].nodes, media };
}

export interface Issue {
  code: string;
  message: string;
  node_id?: string | null;
  input?: string | null;
}

/** Validation issues by node id, then by input name ("" for the node as a whole). */
export function issuesByNode(issues: Issue[]): Record<string, Record<string, string[]>> {
  const grouped: Record<string, Record<string, string[]>> = {};
  for (const issue of issues) {
    const node = issue.node_id ?? "";
    const input = issue.input ?? "";
    grouped[node] ??= {};
    (grouped[node][input] ??= []).push(issue.message);
  }
  return grouped;
}
