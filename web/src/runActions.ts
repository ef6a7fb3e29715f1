// The runs in the store: server events applied as they come, the runs read again on (re)connecting,
// queuing the graph, the history's prompts, and deleting a finished run.

import { api, ApiError } from "./api";
import { currentGraph as graph, type EditorState, getState, runView, set } from "./editorState";
import { graphToWorkflow } from "./graph";
import { graphActions } from "./graphActions";
import { say } from "./messages";
import { graphOfRun, loadRunGraphs, rememberRun } from "./runGraphs";
import { applyEvent, issuesByNode, runsFromApi, type ServerEvent, withoutRun } from "./runState";

/** How many of the newest runs the queue panel reads from the server when it (re)connects. */
const RESYNC_RUNS = 50;
/** Events received while a resync reads the runs: applied again on top of what it read. */
let missed: ServerEvent[] | null = null;
/** Runs whose workflow was asked for (the history's prompts), answered or not yet. */
const runInfoAsked = new Set<string>();
export const MAX_BATCH = 100;

/** Whether a run submitted from graph `graphId` is queued or running (a tab shows it). */
export function graphBusy(current: EditorState, graphId: string): boolean {
  return Object.values(current.runs.runs).some((run) => (run.status === "queued" || run.status === "running")
                                                        && graphOfRun(run.id) === graphId);
}

export const runActions = {
  event(event: ServerEvent): void {
    missed?.push(event);
    set({ runs: applyEvent(getState().runs, event) });
  },

  /** The event stream opened or closed. On opening (the page's first, or after a drop) the runs are
   *  read from the server, since events sent while this page was not listening are not replayed. */
  async setConnected(connected: boolean): Promise<void> {
    set({ connected });
    if (connected) await runActions.resync();
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
        set({ runs: arriving.reduce(applyEvent, runsFromApi(list, live)), runInfo: { ...getState().runInfo, ...prompts } });
      }
    } catch (error) {
      say(`cannot read the runs: ${(error as Error).message}`, true);
    } finally {
      if (missed === arriving) missed = null;
    }
  },

  /** Queue the graph `batchCount` times (seeds marked random get new values between the runs). */
  async run(): Promise<void> {
    const ids: string[] = [];
    try {
      for (let i = 0; i < getState().batchCount; i++) {
        const { id } = await api.submit(graphToWorkflow(graph()));
        ids.push(id);
        rememberRun(id, getState().graphId);
        // Its events may have come first: shown now it is known as ours.
        set({ issues: {}, ...runView(getState()) });
        graphActions.randomizeSeeds();
      }
      say(ids.length === 1 ? `queued run ${ids[0].slice(0, 8)}` : `queued ${ids.length} runs`);
    } catch (error) {
      if (ids.length > 0) say(`queued ${ids.length} of ${getState().batchCount} runs`, true);
      if (error instanceof ApiError && error.issues.length > 0) {
        set({ issues: issuesByNode(error.issues) });
        say(`not run: ${error.issues.map((i) => i.message).join("; ")}`, true);
      } else {
        say(`cannot run: ${(error as Error).message}`, true);
      }
    }
  },

  /** How many runs the Run button queues at once. */
  setBatchCount(count: number): void {
    if (Number.isInteger(count) && count >= 1 && count <= MAX_BATCH) set({ batchCount: count });
  },

  /** Read the prompt of each listed run not known yet: from the list of the newest runs (one request,
   *  no workflows), else from the run itself (GET /api/runs/{id}) for an older one. */
  async loadRunInfo(ids: string[]): Promise<void> {
    const wanted = ids.filter((id) => !(id in getState().runInfo) && !runInfoAsked.has(id));
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
    if (Object.keys(found).length > 0) set({ runInfo: { ...getState().runInfo, ...found } });
  },

  /** Delete a finished run from the server's history (DELETE /api/runs/{id}; its files stay). It leaves
   *  the list now, and on every other page by the `run_deleted` event; a refusal (a run not finished)
   *  is said with the server's reason. */
  async deleteRun(id: string): Promise<void> {
    try {
      await api.deleteRun(id);
      set({ runs: withoutRun(getState().runs, id) });
    } catch (error) {
      say(`cannot delete run ${id.slice(0, 8)}: ${(error as Error).message}`, true);
    }
  },
};
