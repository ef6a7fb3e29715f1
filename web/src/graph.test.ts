import { describe, expect, it } from "vitest";

import { catalogue } from "./testCatalogue";
import {
  arrange, connect, connectionProblem, hasOverlaps, copySelection, createNode, emptyGraph, freeSpot, graphToWorkflow,
  linkUnambiguousInputs, newNodeId, paste, removeItems, toggleMode, workflowToGraph, type WorkflowDocument,
} from "./graph";

const arithmetic: WorkflowDocument = {
  version: 1,
  nodes: {
    a: { type: "Integer", inputs: { value: 3 } },
    sum: { type: "Math", inputs: { a: { from: "a", output: "value" }, b: 4.5, operation: "add" } },
    text: { type: "FormatText", inputs: { template: "= {a}", a: { from: "sum", output: "result" } } },
  },
  ui: { nodes: { a: { pos: [40, 80] }, sum: { pos: [260, 80], randomize: [] }, text: { pos: [480, 80] } } },
};

describe("workflow documents", () => {
  it("round-trip through the graph, links as edges", () => {
    const graph = workflowToGraph(arithmetic);
    expect(graph.edges.map((e) => `${e.source}.${e.sourceHandle}->${e.target}.${e.targetHandle}`))
      .toEqual(["a.value->sum.a", "sum.result->text.a"]);
    expect(graph.nodes.find((n) => n.id === "sum")?.data.values).toEqual({ b: 4.5, operation: "add" });
    const back = graphToWorkflow(graph);
    expect(back.nodes).toEqual(arithmetic.nodes);
    expect(back.ui?.nodes?.text).toEqual({ pos: [480, 80] });
  });

  it("keeps which seeds are randomised in the ui block", () => {
    const graph = workflowToGraph({ version: 1, nodes: { s: { type: "Integer", inputs: {} } },
                                    ui: { nodes: { s: { pos: [0, 0], randomize: ["value"] } } } });
    expect(graph.nodes[0].data.randomize).toEqual(["value"]);
    expect(graphToWorkflow(graph).ui?.nodes?.s.randomize).toEqual(["value"]);
  });

  it("keeps every field the editor does not own", () => {
    const document = {
      version: 1,
      nodes: { a: { type: "Integer", inputs: { value: 3 }, title: "Seed", mode: "bypass" } },
      ui: { description: "what this workflow is for", layers: [{ title: "inputs", bounding: [0, 0, 300, 200] }],
            nodes: { a: { pos: [10, 20], color: "#335", collapsed: true } } },
      author: { name: "someone" },
    };
    const back = graphToWorkflow(workflowToGraph(structuredClone(document)));
    expect(back).toEqual(document);
    // Also after editing and copying.
    const graph = workflowToGraph(structuredClone(document));
    const pasted = paste(removeItems(graph, new Set(), new Set()), copySelection(graph, new Set(["a"])), { x: 0, y: 0 });
    const again = graphToWorkflow(pasted);
    expect(again.ui?.description).toBe("what this workflow is for");
    expect((again as unknown as { author: unknown }).author).toEqual({ name: "someone" });
    expect(again.nodes.integer).toEqual({ type: "Integer", inputs: { value: 3 }, title: "Seed", mode: "bypass" });
    expect(again.ui?.nodes?.integer).toMatchObject({ color: "#335", collapsed: true });
  });

  it("reads and writes groups, notes, reroutes and node titles, colours and collapsing in the agreed ui format", () => {
    const document = structuredClone(arithmetic);
    document.ui = {
      nodes: { a: { pos: [40, 80], title: "Seed", color: "#8c3a3a", collapsed: true }, sum: { pos: [260, 80] },
               text: { pos: [480, 80] } },
      groups: [{ id: "g", title: "numbers", color: "#3f789e", bounds: [0, 0, 500, 300] }],
      notes: [{ id: "n", text: "# hi", pos: [0, 400], size: [200, 100] }, { id: "m", text: "x", pos: [1, 2], size: [3, 4], color: "#222226" }],
      reroutes: [{ id: "r1", pos: [150, 90], to: { node: "sum", input: "a" } }, { id: "r2", pos: [200, 95], to: { node: "sum", input: "a" } }],
    };
    const graph = workflowToGraph(structuredClone(document));
    expect(graph.nodes[0].data).toMatchObject({ title: "Seed", color: "#8c3a3a", collapsed: true });
    expect(graph.groups.map((g) => g.title)).toEqual(["numbers"]);
    const back = graphToWorkflow(graph);
    expect(back.ui).toEqual(document.ui);
    // Reroutes go with their link: removing it (or its node) takes them.
    expect(graphToWorkflow(removeItems(graph, new Set(), new Set(["sum:a"]))).ui?.reroutes).toBeUndefined();
    expect(removeItems(graph, new Set(["a"]), new Set()).reroutes).toEqual([]);
    // A link from another output into the same input does not keep the old link's points; the same one does.
    expect(connect(graph, { source: "a", sourceHandle: "value", target: "sum", targetHandle: "a" }).reroutes).toHaveLength(2);
    expect(connect(graph, { source: "text", sourceHandle: "text", target: "sum", targetHandle: "a" }).reroutes).toEqual([]);
  });

  it("refuses a malformed group, note or reroute by its place and id", () => {
    const bad = (ui: Record<string, unknown>) => () => workflowToGraph({ ...arithmetic, ui: { ...arithmetic.ui, ...ui } });
    expect(bad({ groups: [{ id: "g", title: "t", color: "red", bounds: [0, 0, 1, 1] }] })).toThrow(/ui.groups\[0\] \(g\)/);
    expect(bad({ notes: [{ id: "n", text: 5, pos: [0, 0], size: [1, 1] }] })).toThrow(/ui.notes\[0\] \(n\)/);
    expect(bad({ reroutes: [{ id: "r", pos: [0, 0], to: "sum" }] })).toThrow(/ui.reroutes\[0\] \(r\)/);
    expect(bad({ groups: {} })).toThrow(/ui.groups: expected a list/);
  });

  it("lays out nodes without positions and refuses other documents", () => {
    const graph = workflowToGraph({ version: 1, nodes: { x: { type: "Integer", inputs: {} }, y: { type: "Integer", inputs: {} } } });
    expect(graph.nodes.map((n) => n.position.x)).toEqual([40, 300]);
    expect(() => workflowToGraph({ "1": { class_type: "KSampler" } })).toThrow(/not a nodegraph workflow/);
    expect(() => workflowToGraph({ nodes: { x: {} } })).toThrow(/node x/);
  });
});

describe("editing", () => {
  it("creates nodes with defaults and fresh ids", () => {
    const node = createNode(catalogue.nodes.Math, newNodeId("Math", new Set(["math"])), { x: 1, y: 2 });
    expect(node.id).toBe("math_2");
    expect(node.data.values).toEqual({ a: 0, b: 0, operation: "add" });
    expect(newNodeId("FormatText", new Set())).toBe("format_text");
    expect([newNodeId("VAEDecode", new Set()), newNodeId("KSampler", new Set()), newNodeId("LoadVAE", new Set())])
      .toEqual(["vae_decode", "ksampler", "load_vae"]);
  });

  it("refuses incompatible types and cycles, and one link replaces another", () => {
    const graph = workflowToGraph(arithmetic);
    const stringToFloat = { source: "text", sourceHandle: "text", target: "sum", targetHandle: "b" };
    expect(connectionProblem(catalogue, graph, stringToFloat)).toBe("STRING cannot feed FLOAT");
    expect(connectionProblem(catalogue, graph, { source: "a", sourceHandle: "value", target: "sum", targetHandle: "b" })).toBeNull();
    const cycle = { source: "text", sourceHandle: "text", target: "text", targetHandle: "a" };
    expect(connectionProblem(catalogue, graph, cycle)).toBe("a node cannot feed itself");
    const loop = { source: "sum", sourceHandle: "result", target: "sum", targetHandle: "b" };
    expect(connectionProblem(catalogue, graph, loop)).not.toBeNull();

    const linked = connect(graph, { source: "a", sourceHandle: "value", target: "sum", targetHandle: "b" });
    expect(graphToWorkflow(linked).nodes.sum.inputs.b).toEqual({ from: "a", output: "value" });
    expect(linked.nodes.find((n) => n.id === "sum")?.data.values).toEqual({ b: 4.5, operation: "add" });  // kept for unlinking
    const relinked = connect(linked, { source: "sum", sourceHandle: "result", target: "text", targetHandle: "a" });
    expect(relinked.edges.filter((e) => e.target === "text")).toHaveLength(1);
  });

  it("removes nodes with their links", () => {
    const graph = removeItems(workflowToGraph(arithmetic), new Set(["sum"]), new Set());
    expect(graph.nodes.map((n) => n.id)).toEqual(["a", "text"]);
    expect(graph.edges).toEqual([]);
  });

  it("copies and pastes a selection with renamed ids and inner links", () => {
    const graph = workflowToGraph(arithmetic);
    const snippet = copySelection(graph, new Set(["a", "sum"]));
    expect(snippet.edges).toHaveLength(1);
    const pasted = paste(graph, snippet, { x: 40, y: 40 });
    expect(pasted.nodes.map((n) => n.id)).toEqual(["a", "sum", "text", "integer", "math"]);
    expect(pasted.nodes.filter((n) => n.selected).map((n) => n.id)).toEqual(["integer", "math"]);
    expect(pasted.nodes[3].position).toEqual({ x: 80, y: 120 });
    expect(pasted.edges.at(-1)).toMatchObject({ source: "integer", target: "math", targetHandle: "a" });
    // The copy is independent of the original.
    pasted.nodes[3].data.values.value = 99;
    expect(graph.nodes[0].data.values.value).toBe(3);
  });
});

describe("arrange", () => {
  it("lays nodes out in columns by link depth without overlaps", () => {
    const graph = workflowToGraph({ version: 1, nodes: {
      a: { type: "Integer", inputs: {} }, b: { type: "Integer", inputs: {} },
      sum: { type: "Math", inputs: { a: { from: "a", output: "value" }, b: { from: "b", output: "value" } } },
      text: { type: "FormatText", inputs: { a: { from: "sum", output: "result" } } },
    }, ui: { nodes: { a: { pos: [0, 0] }, b: { pos: [10, 10] }, sum: { pos: [20, 20] }, text: { pos: [30, 30] } } } });
    const sizes = new Map(["a", "b", "sum", "text"].map((id) => [id, { width: 240, height: 100 }]));
    expect(hasOverlaps(graph, sizes)).toBe(true);
    const arranged = arrange(graph, sizes);
    expect(Object.fromEntries(arranged.nodes.map((n) => [n.id, n.position]))).toEqual({
      a: { x: 0, y: 0 }, b: { x: 0, y: 130 }, sum: { x: 300, y: 0 }, text: { x: 600, y: 0 } });
    expect(hasOverlaps(arranged, sizes)).toBe(false);
    expect(arranged.edges).toBe(graph.edges);
  });
});

describe("adding nodes", () => {
  const link = (type: string) => ({ type, required: true, description: "", link_only: true });
  const spec = (type: string, inputs: Record<string, ReturnType<typeof link>>, outputs: Record<string, string>) => ({
    type, display_name: type, category: "image", description: "", version: 1, output_node: false, deprecated: false,
    pack: "test", aliases: [], inputs, outputs: Object.fromEntries(Object.entries(outputs).map(([n, t]) => [n, { type: t, description: "" }])),
  });
  const pictures = structuredClone(catalogue);
  pictures.nodes.Picture = spec("Picture", {}, { image: "IMAGE" });
  pictures.nodes.Blend = spec("Blend", { first: link("IMAGE"), second: link("IMAGE") }, { image: "IMAGE" });
  pictures.nodes.Show = spec("Show", { value: link("*") }, {});
  const at = (x: number, y: number) => ({ x, y });
  const graphOf = (...nodes: [string, string][]) => ({
    ...emptyGraph(), nodes: nodes.map(([id, type], i) => createNode(pictures.nodes[type], id, at(300 * i, 0))),
  });

  it("moves a new node off a spot another node holds", () => {
    const graph = graphOf(["a", "Integer"]);
    expect(freeSpot(graph, at(0, 0))).toEqual(at(32, 32));
    expect(freeSpot(graph, at(100, 0))).toEqual(at(100, 0));
    const two = { ...graph, nodes: [...graph.nodes, createNode(pictures.nodes.Integer, "b", at(32, 32))] };
    expect(freeSpot(two, at(10, 5))).toEqual(at(74, 69));
  });

  it("links a new node's required inputs where exactly one output fits, not one that feeds it already", () => {
    // One picture: both of Blend's inputs could take it, but the second is left for the user to choose.
    let graph = connect(graphOf(["p", "Picture"], ["blend", "Blend"]),
                        { source: "p", sourceHandle: "image", target: "blend", targetHandle: "first" });
    let result = linkUnambiguousInputs(pictures, graph, "blend");
    expect(result.linked).toEqual([]);
    // Without the first link, the one picture feeds "first" only.
    graph = graphOf(["p", "Picture"], ["blend", "Blend"]);
    result = linkUnambiguousInputs(pictures, graph, "blend");
    expect(result.linked.map((c) => `${c.source}.${c.sourceHandle}->${c.targetHandle}`)).toEqual(["p.image->first"]);
    // Two pictures: ambiguous, nothing linked; an input that takes anything is never guessed.
    expect(linkUnambiguousInputs(pictures, graphOf(["p", "Picture"], ["q", "Picture"], ["blend", "Blend"]), "blend").linked)
      .toEqual([]);
    expect(linkUnambiguousInputs(pictures, graphOf(["p", "Picture"], ["show", "Show"]), "show").linked).toEqual([]);
    // A link that would make a cycle is not made: the only other IMAGE output is downstream of the node.
    const loop = connect(graphOf(["blend", "Blend"], ["after", "Blend"]),
                         { source: "blend", sourceHandle: "image", target: "after", targetHandle: "first" });
    expect(linkUnambiguousInputs(pictures, loop, "blend").linked).toEqual([]);
  });
});

describe("node modes", () => {
  it("reads and writes a node's mode as the document's top-level field, absent when it runs", () => {
    const document = structuredClone(arithmetic);
    document.nodes.sum.mode = "bypass";
    document.nodes.text.mode = "mute";
    const graph = workflowToGraph(document);
    expect(graph.nodes.map((node) => node.data.mode)).toEqual([undefined, "bypass", "mute"]);
    const back = graphToWorkflow(graph);
    expect(back.nodes.sum).toEqual({ ...arithmetic.nodes.sum, mode: "bypass" });
    expect(back.nodes.text.mode).toBe("mute");
    expect("mode" in back.nodes.a).toBe(false);
    // A mode the editor does not know is written back as it came, for the server to report.
    document.nodes.a.mode = "sleep";
    expect(graphToWorkflow(workflowToGraph(document)).nodes.a.mode).toBe("sleep");
  });

  it("toggles a mode on a set of nodes: on for all, off when all have it", () => {
    const graph = workflowToGraph(arithmetic);
    const bypassed = toggleMode(graph, new Set(["a", "sum"]), "bypass");
    expect(bypassed.nodes.map((node) => node.data.mode)).toEqual(["bypass", "bypass", undefined]);
    const muted = toggleMode(bypassed, new Set(["sum", "text"]), "mute");
    expect(muted.nodes.map((node) => node.data.mode)).toEqual(["bypass", "mute", "mute"]);
    const back = toggleMode(muted, new Set(["sum", "text"]), "mute");
    expect(back.nodes.map((node) => node.data.mode)).toEqual(["bypass", undefined, undefined]);
    expect("mode" in back.nodes[1].data).toBe(false);
  });
});
