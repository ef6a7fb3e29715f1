// Which graph each run was submitted from (run id -> graph id): a run's pictures show on that graph's
// nodes and its tab is marked busy. Kept in local storage so a reload still knows.

/** Which graph each run was submitted from (run id -> graph id), newest last. */
export const RUN_GRAPHS_KEY = "nodegraph.runGraphs";
const RUN_GRAPHS_KEPT = 500;

const runGraphs = new Map<string, string>();

/** Read what local storage knows (after a reload, or another page's runs on a resync). */
export function loadRunGraphs(): void {
  try {
    const saved = JSON.parse(localStorage.getItem(RUN_GRAPHS_KEY) ?? "[]") as unknown;
    if (Array.isArray(saved)) for (const [run, graphId] of saved) runGraphs.set(String(run), String(graphId));
  } catch {
    // Unreadable or no storage: runs from before this page load are then shown as nobody's.
  }
}

/** Run `runId` was submitted from graph `graphId`. */
export function rememberRun(runId: string, graphId: string): void {
  runGraphs.set(runId, graphId);
  while (runGraphs.size > RUN_GRAPHS_KEPT) runGraphs.delete(runGraphs.keys().next().value as string);
  try {
    localStorage.setItem(RUN_GRAPHS_KEY, JSON.stringify([...runGraphs]));
  } catch {
    // As above: only this page then knows whose the run is.
  }
}

/** The graph run `runId` was submitted from, if known. */
export function graphOfRun(runId: string): string | undefined {
  return runGraphs.get(runId);
}

/** Whether any run was submitted from graph `graphId`. */
export function graphHasRuns(graphId: string): boolean {
  return [...runGraphs.values()].includes(graphId);
}
