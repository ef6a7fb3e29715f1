// Workflow tabs in the store: the open tab lives in the state's fields (history, graphId, workflowName,
// savedAs, viewport), the others in `tabs` as they were left; opening, switching and closing them.

import { type EditorState, getState, newGraphId, set, setQuietly, UNTITLED } from "./editorState";
import { emptyGraph, withDefaults, workflowToGraph } from "./graph";
import { endOngoingEdits } from "./graphActions";
import { startHistory } from "./history";
import { graphHasRuns } from "./runGraphs";
import { blank, edited, neighbourOf, type Tab } from "./tabs";
import type { Viewport } from "./viewport";

/** The open tab as its live fields say. */
export function liveTab(): Tab {
  const state = getState();
  const tab: Tab = { graphId: state.graphId, workflowName: state.workflowName, savedAs: state.savedAs, history: state.history };
  if (state.viewport) tab.viewport = state.viewport;
  if (state.editedBefore) tab.editedBefore = true;
  return tab;
}

/** Every tab, the open one up to date. */
export function currentTabs(): Tab[] {
  const tabs = [...getState().tabs];
  tabs[Math.min(getState().activeTab, tabs.length)] = liveTab();
  return tabs;
}

/** The fields that make `tab` the open one. */
export function opened(tab: Tab): Partial<EditorState> {
  endOngoingEdits();
  return { graphId: tab.graphId, workflowName: tab.workflowName, savedAs: tab.savedAs, history: tab.history,
           viewport: tab.viewport, editedBefore: tab.editedBefore === true, issues: {} };
}

export const tabActions = {
  /** Open a workflow document in a new tab, or in the open one if it is unchanged since it was opened
   *  and has submitted no run (with `newTab`: only if it is blank). Not an undo step: the graph starts
   *  a new history. */
  load(document: unknown, name: string, newTab = false): void {
    const read = workflowToGraph(document);
    const catalogue = getState().catalogue;
    const graph = catalogue === null ? read : withDefaults(read, catalogue);
    const tab: Tab = { graphId: newGraphId(), workflowName: name, savedAs: null, history: startHistory(graph) };
    const current = liveTab();
    const keep = newTab ? !blank(current)
      : edited(current) || current.history.future.length > 0 || graphHasRuns(current.graphId);
    const tabs = currentTabs();
    const activeTab = keep ? tabs.length : getState().activeTab;
    tabs[activeTab] = tab;
    set({ tabs, activeTab, ...opened(tab), loads: getState().loads + 1 });
  },

  /** Open a new, empty tab. */
  newTab(): void {
    const tabs = currentTabs();
    const tab: Tab = { graphId: newGraphId(), workflowName: UNTITLED, savedAs: null, history: startHistory(emptyGraph()) };
    set({ tabs: [...tabs, tab], activeTab: tabs.length, ...opened(tab) });
  },

  switchTab(index: number): void {
    if (index === getState().activeTab || index < 0 || index >= getState().tabs.length) return;
    const tabs = currentTabs();
    // A tab never looked at since the page loaded is fitted into view once it is drawn.
    set({ tabs, activeTab: index, ...opened(tabs[index]), ...(tabs[index].viewport ? {} : { loads: getState().loads + 1 }) });
  },

  /** Close a tab (its runs stay in the history); the last one closed leaves an empty tab. */
  closeTab(index: number): void {
    const tabs = currentTabs();
    const closing = tabs[index];
    if (closing === undefined) return;
    if (tabs.length === 1) {
      tabActions.newTab();
      set({ tabs: [getState().tabs[1]], activeTab: 0 });
      return;
    }
    const rest = tabs.filter((_, i) => i !== index);
    if (index !== getState().activeTab) {
      set({ tabs: rest, activeTab: getState().activeTab - (index < getState().activeTab ? 1 : 0) });
      return;
    }
    const next = neighbourOf(tabs, closing.graphId) as Tab;
    const activeTab = rest.indexOf(next);
    set({ tabs: rest, activeTab, ...opened(next) });
  },

  /** Where the canvas looks now (kept with the tab). */
  rememberViewport(viewport: Viewport): void {
    setQuietly({ viewport });
  },
};
