// Opening and saving workflows: the server's workflows folder, a file opened or dropped (JSON, a
// nodegraph PNG, a ComfyUI file the server converts), a past run's workflow, New; and image uploads.

import { api } from "./api";
import { comfyEditorExtras, leftOut, withRandomizedSeeds } from "./comfyEditorFile";
import { currentGraph as graph, getState, newGraphId, set, UNTITLED } from "./editorState";
import { emptyGraph, graphToWorkflow } from "./graph";
import { commit, graphActions } from "./graphActions";
import { say } from "./messages";
import { nodeUsage } from "./nodeSearch";
import { workflowFromPng } from "./pngWorkflow";
import { currentTabs, tabActions } from "./tabActions";

/** A name typed for saving, as a workflow file name. */
export function workflowFileName(name: string): string {
  const trimmed = name.trim() || UNTITLED;
  return trimmed.toLowerCase().endsWith(".json") ? trimmed : `${trimmed}.json`;
}

async function writeWorkflow(fileName: string): Promise<void> {
  try {
    await api.saveWorkflow(fileName, graphToWorkflow(graph()));
    set({ workflowName: fileName, savedAs: fileName });
    say(`saved ${fileName}`);
    await workflowActions.refreshWorkflows();
  } catch (error) {
    say(`cannot save ${fileName}: ${(error as Error).message}`, true);
  }
}

export const workflowActions = {
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
    const read = await Promise.all(getState().savedWorkflows.map((name) => api.workflow(name).catch((error: Error) => {
      console.warn(`node search: cannot read ${name} (${error.message}); its nodes are not counted`);
      return null;
    })));
    set({ usage: nodeUsage(read) });
  },

  /** Open the workflow a run was submitted with (GET /api/runs/{id}) in a new tab (in the open one only
   *  if it is blank), so that it never replaces work, saved or not. */
  async openRunWorkflow(runId: string): Promise<void> {
    try {
      const run = await api.run(runId);
      if (typeof run.workflow !== "object" || run.workflow === null) throw new Error("the server sent no workflow for it");
      const tabs = currentTabs().length;
      tabActions.load(run.workflow, `run-${runId.slice(0, 8)}.json`, true);
      set({ viewer: null });
      say(`opened the workflow of run ${runId.slice(0, 8)}${getState().tabs.length > tabs ? " in a new tab" : ""}`);
    } catch (error) {
      say(`cannot open the workflow of run ${runId.slice(0, 8)}: ${(error as Error).message}`, true);
    }
  },

  async openSaved(name: string): Promise<void> {
    try {
      tabActions.load(await api.workflow(name), name);
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
    await workflowActions.refreshWorkflows();  // another tab or person may have saved one since
    if (fileName !== getState().savedAs && getState().savedWorkflows.includes(fileName)) {
      set({ dialog: { kind: "overwrite", name: fileName } });
      return;
    }
    await writeWorkflow(fileName);
  },

  /** Ask for a name to save under. */
  saveAs(): void {
    set({ dialog: { kind: "saveAs", name: workflowFileName(getState().workflowName) } });
  },

  /** Answer the dialog with yes (for Save As, with the name chosen). */
  async confirmDialog(name?: string): Promise<void> {
    const dialog = getState().dialog;
    set({ dialog: null });
    if (dialog?.kind === "overwrite") await writeWorkflow(dialog.name);
    else if (dialog?.kind === "saveAs") await workflowActions.saveToServer(name ?? dialog.name);
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
        const catalogue = getState().catalogue;
        const extras = catalogue && comfyEditorExtras(document, converted.workflow, catalogue);
        document = extras ? withRandomizedSeeds(converted.workflow, extras.randomized) : converted.workflow;
        const dropped = extras ? leftOut(extras) : null;
        const imported = `imported ${file.name} (${converted.importer ?? "converted"})`;
        // Something of the file is not kept: said as a warning, which stays up longer.
        if (dropped) say(`${imported}; left out: ${dropped} (the server's importer did not convert them)`, true);
        else say(imported);
      } else {
        say(`opened ${file.name}`);
      }
      tabActions.load(document, file.name.replace(/\.png$/i, ".json"));  // not the server's file: saving asks
    } catch (error) {
      say(`cannot open ${file.name}: ${(error as Error).message}`, true);
    }
  },

  async uploadImage(nodeId: string, input: string, file: File): Promise<void> {
    try {
      const uploaded = await api.upload(file);
      set({ catalogue: await api.catalogue() });  // the inputs folder's choices now include it
      graphActions.setValue(nodeId, input, uploaded.name);
      say(`uploaded ${uploaded.name}`);
    } catch (error) {
      say(`upload failed: ${(error as Error).message}`, true);
    }
  },
};
