// The node catalogue from GET /api/nodes, and what the editor derives from it: widgets, handle
// colours and which socket types may connect. Nothing here knows any particular node type.

export interface InputSpec {
  type: string;
  required: boolean;
  description: string;
  link_only: boolean;
  default?: unknown;
  ge?: number;
  le?: number;
  gt?: number;
  lt?: number;
  multiple_of?: number;
  choices?: unknown[];
  choices_kind?: string;
  multiline?: boolean;
  [extra: string]: unknown;
}

export interface OutputSpec {
  type: string;
  description: string;
}

export interface NodeTypeSpec {
  type: string;
  display_name: string;
  category: string;
  description: string;
  version: number;
  output_node: boolean;
  deprecated: boolean;
  pack: string;
  /** Other tools' names for this type (with the built-in packs: the ComfyUI node types that import as it). */
  aliases: string[];
  inputs: Record<string, InputSpec>;
  outputs: Record<string, OutputSpec>;
}

export interface SocketTypeSpec {
  description: string;
  color: string;
  accepts: string[];
}

export interface Catalogue {
  nodes: Record<string, NodeTypeSpec>;
  types: Record<string, SocketTypeSpec>;
}

export const ANY_TYPE = "*";

/** Whether an output of type `source` may feed an input of type `target` (the server's rule). */
export function canConnect(catalogue: Catalogue, source: string, target: string): boolean {
  if (source === target || source === ANY_TYPE || target === ANY_TYPE) return true;
  return catalogue.types[target]?.accepts.includes(source) ?? false;
}

export function typeColor(catalogue: Catalogue, type: string): string {
  return catalogue.types[type]?.color ?? "#9e9e9e";
}

export type Widget =
  | { kind: "none" }
  | { kind: "number"; integer: boolean; min?: number; max?: number; step: number }
  | { kind: "seed"; min: number; max: number }
  | { kind: "text"; multiline: boolean }
  | { kind: "choice"; options: string[]; model: boolean }
  | { kind: "image"; options: string[] }
  | { kind: "boolean" }
  | { kind: "json" };

const IMAGE_KINDS = new Set(["inputs", "input", "images", "input_images"]);

/** The widget that edits a literal value of this input; `none` for link-only inputs. */
export function widgetFor(name: string, spec: InputSpec): Widget {
  if (spec.link_only) return { kind: "none" };
  if (spec.choices !== undefined) {
    const options = spec.choices.map(String);
    if (spec.choices_kind !== undefined && IMAGE_KINDS.has(spec.choices_kind)) return { kind: "image", options };
    return { kind: "choice", options, model: spec.choices_kind !== undefined };
  }
  switch (spec.type) {
    case "INT": {
      const min = spec.ge ?? (spec.gt !== undefined ? spec.gt + 1 : undefined);
      const max = spec.le ?? (spec.lt !== undefined ? spec.lt - 1 : undefined);
      if (name === "seed" || name.endsWith("_seed") || spec.seed === true) {
        return { kind: "seed", min: min ?? 0, max: max ?? 2 ** 32 - 1 };
      }
      return { kind: "number", integer: true, min, max, step: spec.multiple_of ?? 1 };
    }
    case "FLOAT":
      return { kind: "number", integer: false, min: spec.ge ?? spec.gt, max: spec.le ?? spec.lt,
               step: spec.multiple_of ?? (typeof spec.step === "number" ? spec.step : 0.01) };
    case "STRING":
      return { kind: "text", multiline: spec.multiline === true };
    case "BOOLEAN":
      return { kind: "boolean" };
    default:
      return { kind: "json" };
  }
}

/** Why a number does not fit a number widget's input (bounds, whole numbers, step), or null if it
 *  does. The server checks the same when a run is submitted; the field shows it as soon as it is typed. */
export function numberProblem(widget: Extract<Widget, { kind: "number" | "seed" }>, value: number): string | null {
  if (!Number.isFinite(value)) return "a number is needed";
  const integer = widget.kind === "seed" || widget.integer;
  if (integer && !Number.isInteger(value)) return "a whole number is needed";
  if (widget.min !== undefined && value < widget.min) return `at least ${widget.min}`;
  if (widget.max !== undefined && value > widget.max) return `at most ${widget.max}`;
  // An integer's step is its multiple_of (a float's step may be only a hint for the arrows).
  if (widget.kind === "number" && integer && widget.step > 1 && value % widget.step !== 0) return `a multiple of ${widget.step}`;
  return null;
}

/** A fresh random seed within the widget's bounds (seed inputs are re-rolled after each run). */
export function randomSeed(widget: Extract<Widget, { kind: "seed" }>, random: () => number = Math.random): number {
  return widget.min + Math.floor(random() * (widget.max - widget.min + 1));
}

/** Node types grouped by category and filtered by a search text (name, category or description). */
export function paletteGroups(catalogue: Catalogue, search: string): [string, NodeTypeSpec[]][] {
  const words = search.toLowerCase().split(/\s+/).filter(Boolean);
  const groups = new Map<string, NodeTypeSpec[]>();
  for (const spec of Object.values(catalogue.nodes)) {
    if (spec.deprecated && words.length === 0) continue;
    const haystack = `${spec.type} ${spec.display_name} ${spec.category} ${spec.description}`.toLowerCase();
    if (!words.every((word) => haystack.includes(word))) continue;
    const list = groups.get(spec.category) ?? [];
    list.push(spec);
    groups.set(spec.category, list);
  }
  for (const list of groups.values()) list.sort((a, b) => a.display_name.localeCompare(b.display_name));
  return [...groups.entries()].sort(([a], [b]) => a.localeCompare(b));
}
