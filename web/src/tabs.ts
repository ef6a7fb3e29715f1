// Workflow tabs: several graphs open at once, each with its own undo history, name, saved file, view and
// runs (runs belong to a graph id). The store holds the open tab's fields live; the others are kept here
// as they were left.

import { graphToWorkflow, type Graph } from "./graph";
import type { History } from "./history";
import type { Viewport } from "./viewport";

export interface Tab {
  graphId: string;
  workflowName: string;
  savedAs: string | null;
  history: History<Graph>;
  /** Where the canvas looked when the tab was left. */
  viewport?: Viewport;
  /** Changed before the page was reloaded (the undo history that showed it is not kept). */
  editedBefore?: boolean;
}

/** A tab as kept in local storage: its graph as a workflow document (its undo history is not kept). */
export interface StoredTab {
  name: string;
  savedAs: string | null;
  graphId: string;
  workflow: unknown;
  /** Changed since it was opened (see `edited`). */
  edited?: boolean;
}

export const TABS_KEY = "nodegraph.tabs";

/** Documents of graphs already written, so an unchanged tab is not converted again on every change. */
const written = new WeakMap<Graph, unknown>();

export function storedTab(tab: Tab): StoredTab {
  const graph = tab.history.present;
  let workflow = written.get(graph);
  if (workflow === undefined) {
    workflow = graphToWorkflow(graph);
    written.set(graph, workflow);
  }
  return { name: tab.workflowName, savedAs: tab.savedAs, graphId: tab.graphId, workflow, edited: edited(tab) };
}

/** The open tabs read back from local storage (entries that cannot be read are left out), or null. */
export function readStoredTabs(text: string | null): { active: string; tabs: StoredTab[] } | null {
  if (text === null) return null;
  const data = JSON.parse(text) as { active?: unknown; tabs?: unknown };
  if (!Array.isArray(data.tabs) || typeof data.active !== "string") return null;
  const tabs = data.tabs.filter((tab): tab is StoredTab => typeof tab === "object" && tab !== null
    && typeof tab.graphId === "string" && typeof tab.name === "string" && typeof tab.workflow === "object");
  return tabs.length > 0 ? { active: data.active, tabs } : null;
}

/** The tab to open when tab `closing` closes: the one after it, else the one before. */
export function neighbourOf(tabs: Tab[], closing: string): Tab | undefined {
  const index = tabs.findIndex((tab) => tab.graphId === closing);
  return tabs[index + 1] ?? tabs[index - 1];
}

/** Whether a tab has changes since it was opened (its undo history is not empty, or was not before
 *  the page was reloaded). */
export function edited(tab: Tab): boolean {
  return tab.history.past.length > 0 || tab.editedBefore === true;
}

/** Whether a tab holds nothing to lose: an empty canvas, never changed (nothing to redo either). */
export function blank(tab: Tab): boolean {
  const graph = tab.history.present;
  return !edited(tab) && tab.history.future.length === 0 && graph.nodes.length === 0 && graph.groups.length === 0
    && graph.notes.length === 0 && graph.reroutes.length === 0;
}
