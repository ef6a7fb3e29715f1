import { beforeEach, describe, expect, it } from "vitest";

import { canvasActions } from "./canvasActions";
import { graphToWorkflow, type UiNode } from "./graph";
import { actions, getState } from "./store";
import { catalogue } from "./testCatalogue";
import type { Group, Note, Reroute } from "./uiElements";

const workflow = {
  version: 1,
  nodes: {
    seed: { type: "Integer", inputs: { value: 5 } },
    sum: { type: "Math", inputs: { a: { from: "seed", output: "value" }, b: 1, operation: "add" } },
    far: { type: "Integer", inputs: { value: 1 } },
  },
  ui: { nodes: { seed: { pos: [0, 0] }, sum: { pos: [300, 0] }, far: { pos: [2000, 2000] } },
        groups: [{ id: "g", title: "numbers", color: "#3f789e", bounds: [-50, -80, 700, 400] }],
        notes: [{ id: "n", text: "inside", pos: [20, 200], size: [100, 50] }],
        reroutes: [{ id: "r", pos: [250, 30], to: { node: "sum", input: "a" } }] },
};

const ui = () => graphToWorkflow(getState().history.present).ui as
  { nodes: Record<string, UiNode>; groups?: Group[]; notes?: Note[]; reroutes?: Reroute[] };
const pos = (id: string) => ui().nodes[id].pos;

describe("canvas elements in the store", () => {
  beforeEach(() => {
    actions.load(structuredClone(workflow), "test.json");
    actions.setCatalogue(catalogue);
  });

  it("records a drag as one undo step back to where it started", () => {
    for (const [x, dragging] of [[10, true], [20, true], [30, false]] as const) {
      actions.nodesChanged([{ type: "position", id: "far", position: { x: 2000 + x, y: 2000 }, dragging }]);
    }
    expect(pos("far")).toEqual([2030, 2000]);
    expect(getState().history.past).toHaveLength(1);
    actions.undo();
    expect(pos("far")).toEqual([2000, 2000]);
  });

  it("moves what is inside a group along with it, and nothing else", () => {
    actions.nodesChanged([{ type: "position", id: "group:g", position: { x: -20, y: -60 }, dragging: true }]);
    actions.nodesChanged([{ type: "position", id: "group:g", position: { x: 0, y: -40 }, dragging: false }]);
    expect(ui().groups).toEqual([{ id: "g", title: "numbers", color: "#3f789e", bounds: [0, -40, 700, 400] }]);
    expect(pos("seed")).toEqual([50, 40]);
    expect(pos("sum")).toEqual([350, 40]);
    expect(pos("far")).toEqual([2000, 2000]);
    expect(ui().notes).toEqual([{ id: "n", text: "inside", pos: [70, 240], size: [100, 50] }]);
    expect(ui().reroutes).toEqual([{ id: "r", pos: [300, 70], to: { node: "sum", input: "a" } }]);
    actions.undo();
    expect(pos("seed")).toEqual([0, 0]);
    // Resized by hand (not React Flow measuring it): its size changes, its contents stay.
    actions.nodesChanged([{ type: "dimensions", id: "group:g", dimensions: { width: 900, height: 500 }, resizing: true }]);
    actions.nodesChanged([{ type: "dimensions", id: "group:g", dimensions: { width: 910, height: 510 }, resizing: false }]);
    actions.nodesChanged([{ type: "dimensions", id: "group:g", dimensions: { width: 1, height: 1 } }]);
    expect(ui().groups![0]).toMatchObject({ bounds: [-50, -80, 910, 510] });
    expect(pos("seed")).toEqual([0, 0]);
  });

  it("groups the selection, renames, colours, collapses and removes", () => {
    actions.nodesChanged([{ type: "select", id: "seed", selected: true }, { type: "select", id: "far", selected: true }]);
    const id = canvasActions.groupSelection() as string;
    const [x, y, w, h] = ui().groups!.find((g) => g.id === id)!.bounds as number[];
    expect(x).toBeLessThan(0);
    expect(y).toBeLessThan(0);
    expect(x + w).toBeGreaterThan(2000 + 240);
    expect(y + h).toBeGreaterThan(2000 + 120);
    canvasActions.updateGroup(id, { title: "all", color: "#8c3a3a" });
    expect(ui().groups!.find((g) => g.id === id)).toMatchObject({ title: "all", color: "#8c3a3a" });
    canvasActions.setNodeLook({ title: "  Seed  ", color: "#355a8c" }, ["seed"]);
    expect(ui().nodes.seed).toEqual({ pos: [0, 0], title: "Seed", color: "#355a8c" });
    canvasActions.setNodeLook({ title: "", color: "" }, ["seed"]);
    expect(ui().nodes.seed).toEqual({ pos: [0, 0] });
    canvasActions.toggleCollapsed(["seed", "sum"]);
    expect([ui().nodes.seed.collapsed, ui().nodes.sum.collapsed]).toEqual([true, true]);
    canvasActions.toggleCollapsed(["seed", "sum"]);
    expect(ui().nodes.seed.collapsed).toBeUndefined();
    canvasActions.removeGroup("g", true);  // with what is inside: seed, sum, the note and the reroute
    expect(Object.keys(graphToWorkflow(getState().history.present).nodes)).toEqual(["far"]);
    expect(ui().notes).toBeUndefined();
    expect(ui().reroutes).toBeUndefined();
  });

  it("adds notes and reroute points in order along their link", () => {
    const note = canvasActions.addNote({ x: 5, y: 6 });
    canvasActions.updateNote(note, { text: "**hi**", color: "#807028" });
    expect(ui().notes!.at(-1)).toEqual({ id: note, text: "**hi**", pos: [5, 6], size: [260, 140], color: "#807028" });
    // The link seed -> sum.a runs from (240, 20) to (300, 20); r sits at 250. A point at 290 comes after it,
    // one at 245 before it.
    const after = canvasActions.addReroute("sum", "a", [290, 25], [240, 20], [300, 20]);
    const before = canvasActions.addReroute("sum", "a", [245, 25], [240, 20], [300, 20]);
    expect(ui().reroutes!.map((r) => r.id)).toEqual([before, "r", after]);
    expect(canvasActions.addReroute("sum", "b", [0, 0], [0, 0], [1, 1])).toBeNull();  // b has no link
  });

  it("selects all, duplicates beside, and pastes the copy with its top-left at a point", () => {
    actions.selectAll();
    const present = getState().history.present;
    expect([...present.nodes, ...present.groups, ...present.notes, ...present.reroutes].every((x) => x.selected)).toBe(true);
    expect(getState().history.past).toHaveLength(0);  // selecting is not an undo step
    actions.duplicate(["seed", "sum"]);
    expect(pos("integer")).toEqual([40, 40]);
    expect(graphToWorkflow(getState().history.present).nodes.math.inputs.a).toEqual({ from: "integer", output: "value" });
    actions.copy(["sum", "far"]);
    expect(actions.canPaste()).toBe(true);
    actions.paste({ x: 500, y: 600 });
    expect([pos("math_2"), pos("integer_2")]).toEqual([[500, 600], [2200, 2600]]);
    actions.selectOnly(["far"]);
    expect(getState().history.present.nodes.filter((n) => n.selected).map((n) => n.id)).toEqual(["far"]);
  });
});
