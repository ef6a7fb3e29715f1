// The node search (double-click on the canvas, or a link dropped in empty space): catalogue node types
// ranked by how well the typed text fits their names (ours, the display name, the catalogue's aliases:
// ComfyUI's names), category and description, optionally only those that can take or give a link of a
// given type.

import { ANY_TYPE, type Catalogue, canConnect, type NodeTypeSpec } from "./catalogue";

/** A link being dragged: from an output of `type` (the new node takes it) or from an input of `type`
 *  (the new node feeds it). */
export interface LinkFilter {
  from: "output" | "input";
  type: string;
}

export interface SearchHit {
  spec: NodeTypeSpec;
  /** With a filter: the new node's socket that the link goes to (an input name, or an output name). */
  socket?: string;
  /** The alias (another tool's name, e.g. ComfyUI's) that matched the text, shown beside ours. */
  alias?: string;
  score: number;
}

/** Lower case, letters and digits only: "K Sampler", "KSampler" and "k-sampler" read alike. */
const compact = (text: string) => text.toLowerCase().replace(/[^a-z0-9]/g, "");

/** The words of a name: "VAEDecodeTiled" -> vae, decode, tiled; "Empty Latent" -> empty, latent. */
function nameWords(name: string): string[] {
  return name.replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/([A-Z]+)([A-Z][a-z])/g, "$1 $2")
    .toLowerCase().split(/[^a-z0-9]+/).filter(Boolean);
}

/** How well one name fits the (compacted) text: whole name, its start, a word's start, anywhere in it. */
function nameScore(name: string, text: string): number {
  const whole = compact(name);
  if (whole === text) return 100;
  if (whole.startsWith(text)) return 80 + 10 * (text.length / whole.length);
  if (nameWords(name).some((word) => word.startsWith(text))) return 60;
  if (whole.includes(text)) return 45;
  return 0;
}

/** The socket of `spec` that the dragged link would join, or undefined if none fits. A socket of the
 *  exact type is preferred to one that only accepts it (or takes anything). */
export function linkSocket(catalogue: Catalogue, spec: NodeTypeSpec, filter: LinkFilter): string | undefined {
  const sockets = filter.from === "output"
    ? Object.entries(spec.inputs).filter(([, input]) => canConnect(catalogue, filter.type, input.type))
    : Object.entries(spec.outputs).filter(([, output]) => canConnect(catalogue, output.type, filter.type));
  const exact = sockets.find(([, socket]) => socket.type === filter.type);
  const typed = sockets.find(([, socket]) => socket.type !== ANY_TYPE);
  return (exact ?? typed ?? sockets[0])?.[0];
}

interface Scored {
  score: number;
  alias?: string;
}

function scoreSpec(spec: NodeTypeSpec, words: string[]): Scored | null {
  const names = [spec.type, spec.display_name];
  const aliases = spec.aliases;
  const whole = compact(words.join(""));
  // The text as one name ("ksampler", "empty latent image"): the best of our names and the aliases.
  let best = Math.max(...names.map((name) => nameScore(name, whole)));
  let alias: string | undefined;
  for (const name of aliases) {
    const score = nameScore(name, whole);
    if (score > best) {
      best = score;
      alias = name;
    }
  }
  if (best > 0) return { score: best, alias };
  // Otherwise every word must be found somewhere: in a name, the category or the description.
  const description = spec.description.toLowerCase();
  const category = spec.category.toLowerCase();
  let total = 0;
  for (const word of words) {
    const text = compact(word);
    const inName = Math.max(...[...names, ...aliases].map((name) => nameScore(name, text)));
    const score = inName > 0 ? inName / 2 : category.includes(text) ? 15 : description.includes(word.toLowerCase()) ? 8 : 0;
    if (score === 0) return null;
    total += score;
  }
  return { score: total / words.length };
}

/** How many times each node type is used in the server's saved workflows: among equally good hits
 *  (and for an empty search, all of them) the more used come first. */
export function nodeUsage(workflows: unknown[]): Record<string, number> {
  const usage: Record<string, number> = {};
  for (const workflow of workflows) {
    const nodes = (workflow as { nodes?: unknown })?.nodes;
    if (typeof nodes !== "object" || nodes === null) continue;
    for (const node of Object.values(nodes as Record<string, { type?: unknown }>)) {
      if (typeof node?.type === "string") usage[node.type] = (usage[node.type] ?? 0) + 1;
    }
  }
  return usage;
}

/** Node types for the search text, best first; with `filter`, only those the dragged link can join,
 *  each with the socket it joins. Deprecated types come last (and not at all without text); among
 *  equal scores, the types `usage` counts more often. */
export function searchNodes(catalogue: Catalogue, query: string, filter?: LinkFilter,
                            usage: Record<string, number> = {}): SearchHit[] {
  const words = query.trim().split(/\s+/).filter(Boolean);
  const hits: SearchHit[] = [];
  for (const spec of Object.values(catalogue.nodes)) {
    if (spec.deprecated && words.length === 0) continue;
    const socket = filter ? linkSocket(catalogue, spec, filter) : undefined;
    if (filter && socket === undefined) continue;
    const scored: Scored | null = words.length === 0 ? { score: 0 } : scoreSpec(spec, words);
    if (scored === null) continue;
    const hit: SearchHit = { spec, score: scored.score };
    if (socket !== undefined) hit.socket = socket;
    if (scored.alias !== undefined) hit.alias = scored.alias;
    hits.push(hit);
  }
  const anyOnly = (hit: SearchHit) => {
    if (!filter || hit.socket === undefined) return 0;
    const socket = filter.from === "output" ? hit.spec.inputs[hit.socket] : hit.spec.outputs[hit.socket];
    return socket.type === ANY_TYPE ? 1 : 0;
  };
  return hits.sort((a, b) => b.score - a.score || Number(a.spec.deprecated) - Number(b.spec.deprecated)
    || anyOnly(a) - anyOnly(b) || (usage[b.spec.type] ?? 0) - (usage[a.spec.type] ?? 0) || a.spec.display_name.localeCompare(b.spec.display_name));
}
