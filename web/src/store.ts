// The editor's store as components and tests use it: the state (editorState.ts), read with
// useEditor(selector) and changed only through `actions`, which gathers the action modules (each one
// concern) and adds the start-up.

import { api } from "./api";
import type { Catalogue } from "./catalogue";
import { currentGraph as graph, getState, set } from "./editorState";
import { withDefaults } from "./graph";
import { graphActions } from "./graphActions";
import { replace } from "./history";
import { dismissMessage, say } from "./messages";
import { MINIMAP_KEY, overlayActions } from "./overlayActions";
import { loadRunGraphs } from "./runGraphs";
import { runActions } from "./runActions";
import { tabActions } from "./tabActions";
import { keepTabsStored, restoreTabs } from "./tabStorage";
import { workflowActions } from "./workflowActions";

export {
  type ContextMenu, type DraggedLink, type Dialog, type EditorState, getState, type SearchRequest, subscribe, useEditor,
} from "./editorState";
export { graphBusy, MAX_BATCH } from "./runActions";
export { workflowFileName } from "./workflowActions";

/** The workflow opened on a first visit (no tabs stored), if the server has it. */
export const DEFAULT_WORKFLOW = "txt2img.json";

keepTabsStored();

const startup = {
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
    if (getState().savedWorkflows.includes(DEFAULT_WORKFLOW)) await actions.openSaved(DEFAULT_WORKFLOW);
  },

  /** The node catalogue arrived: the graph on the canvas shows the schema's defaults for inputs it leaves out. */
  setCatalogue(catalogue: Catalogue): void {
    set({ catalogue, history: replace(getState().history, withDefaults(graph(), catalogue)) });
  },

  notify(text: string, error = false): void {
    say(text, error);
  },

  dismissMessage,
};

export const actions = {
  ...startup, ...graphActions, ...overlayActions, ...tabActions, ...workflowActions, ...runActions,
};
