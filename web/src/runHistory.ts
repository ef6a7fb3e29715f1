// What the history panel shows of a past run beside its images: its prompt (read from the workflow it
// ran) and its time.

import { type Catalogue, widgetFor } from "./catalogue";
import { isLink } from "./graph";

/** The run's prompt: the first non-empty multi-line text input of its workflow, in node order (a
 *  text encoder's prompt comes before its negative, which is usually empty); null if it has none. */
export function promptOf(workflow: unknown, catalogue: Catalogue): string | null {
  const nodes = (workflow as { nodes?: unknown })?.nodes;
  if (typeof nodes !== "object" || nodes === null) return null;
  for (const node of Object.values(nodes as Record<string, { type?: unknown; inputs?: Record<string, unknown> }>)) {
    const spec = typeof node?.type === "string" ? catalogue.nodes[node.type] : undefined;
    if (!spec) continue;
    for (const [name, value] of Object.entries(node.inputs ?? {})) {
      const input = spec.inputs[name];
      if (!input || isLink(value) || typeof value !== "string" || value.trim() === "") continue;
      const widget = widgetFor(name, input);
      if (widget.kind === "text" && widget.multiline) return value;
    }
  }
  return null;
}

/** A run's time for the list: the time of day today, else the date and time. */
export function runTime(seconds: number, now: Date = new Date()): string {
  const when = new Date(seconds * 1000);
  const pad = (n: number) => String(n).padStart(2, "0");
  const clock = `${pad(when.getHours())}:${pad(when.getMinutes())}`;
  const sameDay = when.getFullYear() === now.getFullYear() && when.getMonth() === now.getMonth() && when.getDate() === now.getDate();
  return sameDay ? clock : `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} ${clock}`;
}
