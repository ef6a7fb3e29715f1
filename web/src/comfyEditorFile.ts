// What the server's ComfyUI import leaves to the editor: the server turns the nodes that run into a
// workflow (nodes/diffusion/nodes/comfyui.py), with the file's groups, notes, reroutes and node looks in
// its ui block; seeds set to "randomize" after each run are the editor's to keep, and any note or group
// the converted workflow lacks is reported.

import { type Catalogue, widgetFor } from "./catalogue";
import type { WorkflowDocument } from "./graph";

/** ComfyUI's node types that only hold text for the reader. */
const NOTE_TYPES = new Set(["Note", "MarkdownNote"]);
/** The value of ComfyUI's "control after generate" widget that means: a new random seed after each run. */
const RANDOMIZE = "randomize";

interface ComfyEditorNode {
  id: unknown;
  type: unknown;
  widgets_values?: unknown;
}

export interface ComfyEditorExtras {
  /** Node id -> seed inputs to re-roll after each run (our "random" box). */
  randomized: Record<string, string[]>;
  /** Notes and groups of the file that the converted workflow's ui block does not hold (an older
   *  server's importer leaves them out; the current one keeps them as ui.notes and ui.groups). */
  notes: number;
  groups: number;
}

/** The editor things of a ComfyUI editor-format file (`{"nodes": [...], "links": [...]}`), matched to
 *  the workflow the server converted it into (ComfyUI node ids are kept); null for other documents. */
export function comfyEditorExtras(original: unknown, converted: WorkflowDocument, catalogue: Catalogue): ComfyEditorExtras | null {
  if (typeof original !== "object" || original === null || !Array.isArray((original as { nodes?: unknown }).nodes)) return null;
  const file = original as { nodes: ComfyEditorNode[]; groups?: unknown };
  const randomized: Record<string, string[]> = {};
  let notes = 0;
  for (const node of file.nodes) {
    if (typeof node !== "object" || node === null) continue;
    if (NOTE_TYPES.has(String(node.type))) notes += 1;
    const ours = converted.nodes[String(node.id)];
    const spec = ours && catalogue.nodes[ours.type];
    if (!spec) continue;
    const seeds = randomizedSeedValues(node.widgets_values);
    const inputs = Object.entries(spec.inputs)
      .filter(([name, input]) => widgetFor(name, input).kind === "seed" && seeds.some((seed) => seed === ours.inputs[name]))
      .map(([name]) => name);
    if (inputs.length > 0) randomized[String(node.id)] = inputs;
  }
  const kept = (key: string) => {
    const list = (converted.ui as Record<string, unknown> | undefined)?.[key];
    return Array.isArray(list) ? list.length : 0;
  };
  const groups = Array.isArray(file.groups) ? file.groups.length : 0;
  return { randomized, notes: Math.max(0, notes - kept("notes")), groups: Math.max(0, groups - kept("groups")) };
}

/** The seed values a node's widgets mark "randomize": the control widget follows its seed. */
function randomizedSeedValues(widgets: unknown): unknown[] {
  if (Array.isArray(widgets)) return widgets.flatMap((value, i) => value === RANDOMIZE && i > 0 ? [widgets[i - 1]] : []);
  if (typeof widgets === "object" && widgets !== null) {  // newer files: {"seed": 5, "control_after_generate": ...}
    const named = widgets as Record<string, unknown>;
    if (named.control_after_generate !== RANDOMIZE) return [];
    return Object.entries(named).filter(([name]) => name === "seed" || name.endsWith("_seed")).map(([, value]) => value);
  }
  return [];
}

/** The workflow with those seeds marked random in its `ui` block. */
export function withRandomizedSeeds(workflow: WorkflowDocument, randomized: Record<string, string[]>): WorkflowDocument {
  const nodes = { ...workflow.ui?.nodes };
  for (const [id, inputs] of Object.entries(randomized)) nodes[id] = { ...nodes[id], randomize: inputs };
  return { ...workflow, ui: { ...workflow.ui, nodes } };
}

/** What the import left out, for the user: "2 notes, 1 group", or null if nothing. */
export function leftOut(extras: ComfyEditorExtras): string | null {
  const parts = [];
  if (extras.notes > 0) parts.push(`${extras.notes} note${extras.notes === 1 ? "" : "s"}`);
  if (extras.groups > 0) parts.push(`${extras.groups} group${extras.groups === 1 ? "" : "s"}`);
  return parts.length > 0 ? parts.join(", ") : null;
}
