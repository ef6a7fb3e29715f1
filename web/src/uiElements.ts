// The canvas things that never change what runs, kept in the document's `ui` block: groups (titled,
// coloured frames that move the nodes inside them), notes (markdown) and reroute points on links.
// Format (agreed with the engine and the ComfyUI import): ui.groups = [{id, title, color, bounds: [x, y, w, h]}],
// ui.notes = [{id, text, pos: [x, y], size: [w, h], color?}], ui.reroutes = [{id, pos: [x, y], to: {node, input}}]
// (the points of one link in array order from its source to its target).

export type Point = [number, number];

export interface Group {
  id: string;
  title: string;
  color: string;
  bounds: [number, number, number, number];
  selected?: boolean;
}

export interface Note {
  id: string;
  text: string;
  pos: Point;
  size: Point;
  color?: string;
  selected?: boolean;
}

export interface Reroute {
  id: string;
  pos: Point;
  to: { node: string; input: string };
  selected?: boolean;
}

export interface UiElements {
  groups: Group[];
  notes: Note[];
  reroutes: Reroute[];
}

export class UiFormatError extends Error {}

export const COLOR = /^#[0-9a-fA-F]{6}$/;
export const DEFAULT_GROUP_COLOR = "#3f789e";
export const DEFAULT_NOTE_SIZE: Point = [260, 140];

const isRecord = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);
const numbers = (value: unknown, length: number): value is number[] =>
  Array.isArray(value) && value.length === length && value.every((n) => typeof n === "number" && Number.isFinite(n));

function list(ui: Record<string, unknown>, key: string, shape: string): Record<string, unknown>[] {
  const value = ui[key];
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new UiFormatError(`ui.${key}: expected a list of ${shape}`);
  return value.map((entry, index) => {
    if (!isRecord(entry) || typeof entry.id !== "string") throw new UiFormatError(`ui.${key}[${index}]: expected ${shape}`);
    return entry;
  });
}

/** The groups, notes and reroutes of a document's `ui` block; a malformed entry is refused by name. */
export function readUiElements(ui: unknown): UiElements {
  if (!isRecord(ui)) return { groups: [], notes: [], reroutes: [] };
  const groupShape = '{"id", "title", "color": "#rrggbb", "bounds": [x, y, w, h]}';
  const groups = list(ui, "groups", groupShape).map((entry, index): Group => {
    if (typeof entry.title !== "string" || typeof entry.color !== "string" || !COLOR.test(entry.color) || !numbers(entry.bounds, 4)) {
      throw new UiFormatError(`ui.groups[${index}] (${entry.id}): expected ${groupShape}`);
    }
    return { id: entry.id as string, title: entry.title, color: entry.color, bounds: [...entry.bounds] as Group["bounds"] };
  });
  const noteShape = '{"id", "text", "pos": [x, y], "size": [w, h], "color"?: "#rrggbb"}';
  const notes = list(ui, "notes", noteShape).map((entry, index): Note => {
    const colorOk = entry.color === undefined || (typeof entry.color === "string" && COLOR.test(entry.color));
    if (typeof entry.text !== "string" || !numbers(entry.pos, 2) || !numbers(entry.size, 2) || !colorOk) {
      throw new UiFormatError(`ui.notes[${index}] (${entry.id}): expected ${noteShape}`);
    }
    const note: Note = { id: entry.id as string, text: entry.text, pos: [...entry.pos] as Point, size: [...entry.size] as Point };
    if (typeof entry.color === "string") note.color = entry.color;
    return note;
  });
  const rerouteShape = '{"id", "pos": [x, y], "to": {"node", "input"}}';
  const reroutes = list(ui, "reroutes", rerouteShape).map((entry, index): Reroute => {
    const to = entry.to;
    if (!numbers(entry.pos, 2) || !isRecord(to) || typeof to.node !== "string" || typeof to.input !== "string") {
      throw new UiFormatError(`ui.reroutes[${index}] (${entry.id}): expected ${rerouteShape}`);
    }
    return { id: entry.id as string, pos: [...entry.pos] as Point, to: { node: to.node, input: to.input } };
  });
  return { groups, notes, reroutes };
}

const round = (n: number) => Math.round(n);

/** The `ui` block entries for the elements (none for an empty list). */
export function writeUiElements(elements: UiElements): Record<string, unknown> {
  const ui: Record<string, unknown> = {};
  if (elements.groups.length > 0) {
    ui.groups = elements.groups.map((g) => ({ id: g.id, title: g.title, color: g.color, bounds: g.bounds.map(round) }));
  }
  if (elements.notes.length > 0) {
    ui.notes = elements.notes.map((n) => ({ id: n.id, text: n.text, pos: n.pos.map(round), size: n.size.map(round),
                                            ...(n.color ? { color: n.color } : {}) }));
  }
  if (elements.reroutes.length > 0) {
    ui.reroutes = elements.reroutes.map((r) => ({ id: r.id, pos: r.pos.map(round), to: { ...r.to } }));
  }
  return ui;
}

/** A new id with this prefix, unused in `taken`: group_1, group_2, ... */
export function newElementId(prefix: string, taken: Iterable<string>): string {
  const used = new Set(taken);
  for (let n = 1; ; n++) if (!used.has(`${prefix}_${n}`)) return `${prefix}_${n}`;
}

export interface Box {
  x: number;
  y: number;
  width: number;
  height: number;
}

/** The bounds of a group around boxes, with room for its title bar. */
export function boundsAround(boxes: Box[], padding = 30, title = 36): Group["bounds"] {
  const left = Math.min(...boxes.map((b) => b.x)) - padding;
  const top = Math.min(...boxes.map((b) => b.y)) - padding - title;
  const right = Math.max(...boxes.map((b) => b.x + b.width)) + padding;
  const bottom = Math.max(...boxes.map((b) => b.y + b.height)) + padding;
  return [left, top, right - left, bottom - top];
}

/** Whether a box's centre lies inside a group: what the group carries when it is moved. */
export function insideGroup(group: Group, box: Box): boolean {
  const [x, y, w, h] = group.bounds;
  const cx = box.x + box.width / 2;
  const cy = box.y + box.height / 2;
  return cx >= x && cx <= x + w && cy >= y && cy <= y + h;
}

/** The reroute points of the link into `node`.`input`, in order from its source. */
export function pointsOf(reroutes: Reroute[], node: string, input: string): Reroute[] {
  return reroutes.filter((r) => r.to.node === node && r.to.input === input);
}

function distanceToSegment(p: Point, a: Point, b: Point): number {
  const [dx, dy] = [b[0] - a[0], b[1] - a[1]];
  const length = dx * dx + dy * dy;
  const t = length === 0 ? 0 : Math.max(0, Math.min(1, ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / length));
  return Math.hypot(p[0] - (a[0] + t * dx), p[1] - (a[1] + t * dy));
}

/** Where a new point at `at` goes among a link's points (source, ...points, target): the index in
 *  `points` before which it lies, by the nearest leg of the link. */
export function rerouteIndex(source: Point, points: Point[], target: Point, at: Point): number {
  const path = [source, ...points, target];
  let best = 0;
  let nearest = Infinity;
  for (let leg = 0; leg < path.length - 1; leg++) {
    const distance = distanceToSegment(at, path[leg], path[leg + 1]);
    if (distance < nearest) {
      nearest = distance;
      best = leg;
    }
  }
  return best;
}

/** The reroutes with a new point on the link into `to`, at its place in the link's order. */
export function addReroute(reroutes: Reroute[], reroute: Reroute, source: Point, target: Point): Reroute[] {
  const own = pointsOf(reroutes, reroute.to.node, reroute.to.input);
  const index = rerouteIndex(source, own.map((r) => r.pos), target, reroute.pos);
  const others = reroutes.filter((r) => !own.includes(r));
  return [...others, ...own.slice(0, index), reroute, ...own.slice(index)];
}

/** An SVG path from `points[0]` through each point to the last: curves leaving and entering
 *  horizontally, as links between sockets do. */
export function linkPath(points: Point[]): string {
  let path = `M ${points[0][0]},${points[0][1]}`;
  for (let i = 1; i < points.length; i++) {
    const [x0, y0] = points[i - 1];
    const [x1, y1] = points[i];
    const bend = Math.max(Math.abs(x1 - x0) / 2, 40);
    path += ` C ${x0 + bend},${y0} ${x1 - bend},${y1} ${x1},${y1}`;
  }
  return path;
}
