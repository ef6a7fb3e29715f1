import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { graphToWorkflow, type WorkflowDocument } from "./graph";
import { actions, getState } from "./store";
import { catalogue } from "./testCatalogue";
import { stubServer, stubStorage } from "./testServer";

const workflow = {
  version: 1,
  nodes: {
    seed: { type: "Integer", inputs: { value: 5 } },
    sum: { type: "Math", inputs: { a: { from: "seed", output: "value" }, b: 1, operation: "add" } },
  },
  ui: { nodes: { seed: { pos: [0, 0], randomize: ["value"] }, sum: { pos: [300, 0] } } },
};

const values = (id: string) => getState().history.present.nodes.find((node) => node.id === id)?.data.values;

describe("the editor store", () => {
  beforeEach(() => {
    // A catalogue where Integer's value is a seed, as a sampler's seed input would be.
    const seeded = structuredClone(catalogue);
    seeded.nodes.Integer.inputs.value = { ...seeded.nodes.Integer.inputs.value, seed: true, ge: 0, le: 9 };
    actions.load(structuredClone(workflow), "test.json");
    actions.setCatalogue(seeded);
  });

  afterEach(() => {
    vi.useRealTimers();
    vi.unstubAllGlobals();
  });

  it("clears the toolbar message after a while, errors later than news, a newer one restarting the wait", () => {
    vi.useFakeTimers();
    actions.notify("opened test.json");
    vi.advanceTimersByTime(4000);
    actions.notify("saved test.json");
    vi.advanceTimersByTime(4000);
    expect(getState().message?.text).toBe("saved test.json");
    vi.advanceTimersByTime(2000);
    expect(getState().message).toBeNull();
    actions.notify("cannot save: disk full", true);
    vi.advanceTimersByTime(10_000);
    expect(getState().message?.text).toBe("cannot save: disk full");
    vi.advanceTimersByTime(10_000);
    expect(getState().message).toBeNull();
  });

  it("edits values with undo and redo", () => {
    // (a is linked; it holds its default, shown if the link goes)
    actions.setValue("sum", "b", 7);
    actions.setValue("sum", "operation", "subtract");
    expect(values("sum")).toEqual({ a: 0, b: 7, operation: "subtract" });
    actions.undo();
    expect(values("sum")).toEqual({ a: 0, b: 7, operation: "add" });
    actions.undo();
    actions.undo();  // nothing further back than the loaded workflow
    expect(values("sum")).toEqual({ a: 0, b: 1, operation: "add" });
    actions.redo();
    expect(values("sum")).toEqual({ a: 0, b: 7, operation: "add" });
  });

  it("does not make loading an undo step", () => {
    actions.load(structuredClone(workflow), "again.json");
    expect(getState().history.past).toHaveLength(0);
    actions.undo();
    expect(getState().history.present.nodes.map((node) => node.id)).toEqual(["seed", "sum"]);
  });

  it("records typing into one field as one undo step until the field is left", () => {
    const id = actions.addNode("FormatText", { x: 0, y: 0 }) as string;
    const steps = getState().history.past.length;
    const prompt = "a yellow star over a green hill, seen from far away, in the evening light, oil on canvas!!";
    for (let end = 1; end <= prompt.length; end++) actions.setValue(id, "template", prompt.slice(0, end));
    expect(getState().history.past).toHaveLength(steps + 1);
    actions.finishTyping();
    actions.setValue(id, "template", "again");
    expect(getState().history.past).toHaveLength(steps + 2);
    actions.undo();
    expect(values(id)?.template).toBe(prompt);
    actions.undo();
    expect(values(id)?.template).toBe("{a}");
    actions.undo();
    expect(getState().history.present.nodes.map((node) => node.id)).toEqual(["seed", "sum"]);
  });

  it("shows the schema's default for an input the loaded workflow leaves out", () => {
    actions.load({ version: 1, nodes: { m: { type: "Math", inputs: { a: 2 } },
                                        t: { type: "FormatText", inputs: { a: { from: "m", output: "result" } } } } },
                 "partial.json");
    expect(values("m")).toEqual({ a: 2, b: 0, operation: "add" });
    expect(values("t")?.template).toBe("{a}");
    // Filling them in is no edit of the user's: nothing to undo.
    expect(getState().history.past).toHaveLength(0);
  });

  it("brings an input's value back when its link goes", () => {
    actions.setValue("sum", "b", 7.5);
    const integer = actions.addNode("Integer", { x: 0, y: 200 }) as string;
    actions.connect({ source: integer, sourceHandle: "value", target: "sum", targetHandle: "b" });
    expect(graphToWorkflow(getState().history.present).nodes.sum.inputs.b).toEqual({ from: integer, output: "value" });
    actions.nodesChanged([{ type: "remove", id: integer }]);
    expect(values("sum")?.b).toBe(7.5);
    expect(graphToWorkflow(getState().history.present).nodes.sum.inputs.b).toBe(7.5);
    // A link that came with the workflow: unlinked, the input shows the default the run would use.
    actions.edgesChanged([{ type: "remove", id: "sum:a" }]);
    expect(graphToWorkflow(getState().history.present).nodes.sum.inputs.a).toBe(0);
  });

  it("asks before saving over another workflow, keeps the fields it does not own, and forgets the name on New", async () => {
    const files: Record<string, unknown> = {
      "mine.json": { ...structuredClone(workflow), ui: { ...workflow.ui, description: "mine, described" } },
      "other.json": { version: 1, nodes: {} },
    };
    const seen = stubServer({
      "GET /api/workflows": () => ({ workflows: Object.keys(files).map((name) => ({ name })) }),
      "GET /api/workflows/mine.json": () => files["mine.json"],
      "PUT /api/workflows/mine.json": ({ body }) => { files["mine.json"] = body; return { name: "mine.json" }; },
      "PUT /api/workflows/other.json": ({ body }) => { files["other.json"] = body; return { name: "other.json" }; },
      "PUT /api/workflows/new.json": ({ body }) => { files["new.json"] = body; return { name: "new.json" }; },
      "PUT /api/workflows/untitled.json": () => ({ name: "untitled.json" }),
    });
    const puts = () => seen.filter((request) => request.method === "PUT").map((request) => request.path);
    await actions.refreshWorkflows();
    await actions.openSaved("mine.json");
    actions.setValue("sum", "b", 2);
    await actions.saveToServer("mine.json");  // the file it came from: saved without asking
    expect(puts()).toEqual(["/api/workflows/mine.json"]);
    expect((files["mine.json"] as { ui: { description: string } }).ui.description).toBe("mine, described");

    await actions.saveToServer("other");  // another existing file: asked first
    expect(puts()).toHaveLength(1);
    expect(getState().dialog).toEqual({ kind: "overwrite", name: "other.json" });
    actions.closeDialog();
    expect(getState().dialog).toBeNull();
    await actions.saveToServer("other.json");
    await actions.confirmDialog();
    expect(puts()).toEqual(["/api/workflows/mine.json", "/api/workflows/other.json"]);
    expect((files["other.json"] as { nodes: object }).nodes).toHaveProperty("sum");

    actions.saveAs();  // Save As asks for the name
    expect(getState().dialog).toEqual({ kind: "saveAs", name: "other.json" });
    await actions.confirmDialog("new");
    expect(puts().at(-1)).toBe("/api/workflows/new.json");
    expect(getState().workflowName).toBe("new.json");

    actions.newGraph();
    expect(getState().history.present.nodes).toEqual([]);
    expect(getState().workflowName).toBe("untitled.json");
    actions.undo();  // New is undoable; the name stays new, so a save cannot replace new.json unasked
    expect(getState().history.present.nodes).toHaveLength(2);
    await actions.saveToServer(getState().workflowName);
    expect(puts().at(-1)).toBe("/api/workflows/untitled.json");
  });

  it("imports a ComfyUI editor file with its random seeds, and says which notes and groups it left out", async () => {
    const comfy = {
      nodes: [
        { id: 3, type: "KSampler", widgets_values: [5, "randomize", 20, 8, "euler", "normal", 1] },
        { id: 4, type: "KSampler", widgets_values: [6, "fixed", 20, 8, "euler", "normal", 1] },
        { id: 10, type: "Note", widgets_values: ["read me first"] },
        { id: 11, type: "MarkdownNote", widgets_values: ["# and me"] },
      ],
      links: [],
      groups: [{ title: "sampling", bounding: [0, 0, 400, 300] }],
    };
    // What the server's importer makes of it (the stand-in catalogue's seed node stands for a sampler).
    const converted = { version: 1, nodes: { "3": { type: "Integer", inputs: { value: 5 } },
                                             "4": { type: "Integer", inputs: { value: 6 } } },
                        ui: { nodes: { "3": { pos: [10, 10] }, "4": { pos: [10, 200] } } } };
    stubServer({ "POST /api/workflows/convert": () => ({ workflow: converted, importer: "ComfyUI UI format" }) });
    await actions.openFile(new File([JSON.stringify(comfy)], "from-comfy.json", { type: "application/json" }));
    const nodes = getState().history.present.nodes;
    expect(nodes.find((node) => node.id === "3")?.data.randomize).toEqual(["value"]);
    expect(nodes.find((node) => node.id === "4")?.data.randomize).toBeUndefined();
    expect(getState().message?.text).toBe(
      "imported from-comfy.json (ComfyUI UI format); left out: 2 notes, 1 group (the server's importer did not convert them)");
    // An importer that keeps them in the ui block: nothing is said to be left out, and they are drawn.
    const kept = { ...converted, ui: { ...converted.ui,
      notes: [{ id: "10", text: "read me first", pos: [0, 0], size: [200, 80] }, { id: "11", text: "# and me", pos: [0, 100], size: [200, 80] }],
      groups: [{ id: "g1", title: "sampling", color: "#3f789e", bounds: [0, 0, 400, 300] }] } };
    stubServer({ "POST /api/workflows/convert": () => ({ workflow: kept, importer: "ComfyUI UI format" }) });
    await actions.openFile(new File([JSON.stringify(comfy)], "from-comfy.json", { type: "application/json" }));
    expect(getState().message?.text).toBe("imported from-comfy.json (ComfyUI UI format)");
    expect(getState().history.present.notes.map((note) => note.text)).toEqual(["read me first", "# and me"]);
    expect(getState().history.present.groups.map((group) => group.title)).toEqual(["sampling"]);
  });

  it("adds nodes from the catalogue and refuses links between incompatible types", () => {
    const id = actions.addNode("FormatText", { x: 10, y: 10 });
    expect(id).toBe("format_text");
    expect(actions.canConnect({ source: "format_text", sourceHandle: "text", target: "sum", targetHandle: "b" })).toBe(false);
    actions.connect({ source: "format_text", sourceHandle: "text", target: "sum", targetHandle: "b" });
    expect(getState().message).toEqual({ text: "cannot connect: STRING cannot feed FLOAT", error: true });
    actions.connect({ source: "sum", sourceHandle: "result", target: "format_text", targetHandle: "a" });
    expect(graphToWorkflow(getState().history.present).nodes.format_text.inputs.a).toEqual({ from: "sum", output: "result" });
    expect(actions.addNode("NoSuchType", { x: 0, y: 0 })).toBeNull();
  });

  it("adds the node chosen in the search, joined by the dragged link, in one undo step", () => {
    const steps = getState().history.past.length;
    // A link dragged from sum's FLOAT output, let go at (500, 100): a Format Text takes it as "a".
    actions.openSearch({ screen: { x: 0, y: 0 }, at: { x: 500, y: 100 },
                         link: { from: "output", type: "FLOAT", nodeId: "sum", socket: "result" } });
    expect(actions.addFromSearch("FormatText", "a")).toBe("format_text");
    const document = graphToWorkflow(getState().history.present);
    expect(document.nodes.format_text.inputs.a).toEqual({ from: "sum", output: "result" });
    expect(document.ui?.nodes?.format_text.pos).toEqual([500, 80]);
    expect(getState().search).toBeNull();
    expect(getState().history.past).toHaveLength(steps + 1);
    // From an input: the new node is put left of where the link was let go, its output feeding the input.
    actions.openSearch({ screen: { x: 0, y: 0 }, at: { x: 500, y: 400 },
                         link: { from: "input", type: "FLOAT", nodeId: "sum", socket: "b" } });
    actions.addFromSearch("Math", "result");
    const after = graphToWorkflow(getState().history.present);
    expect(after.nodes.sum.inputs.b).toEqual({ from: "math", output: "result" });
    expect(after.ui?.nodes?.math.pos).toEqual([500 - 240, 380]);
  });

  it("drops a link pulled off an input unless the search joins it to a new node", () => {
    actions.openSearch({ screen: { x: 0, y: 0 }, at: { x: 0, y: 0 },
                         link: { from: "output", type: "INT", nodeId: "seed", socket: "value", replaces: "sum:a" } });
    actions.closeSearch();
    expect(getState().history.present.edges).toEqual([]);
    actions.undo();
    expect(getState().history.present.edges.map((edge) => edge.id)).toEqual(["sum:a"]);
    // Chosen: the link goes from its old input to the new node, in one step.
    actions.openSearch({ screen: { x: 0, y: 0 }, at: { x: 0, y: 0 },
                         link: { from: "output", type: "INT", nodeId: "seed", socket: "value", replaces: "sum:a" } });
    actions.addFromSearch("FormatText", "a");
    expect(getState().history.present.edges.map((edge) => edge.id)).toEqual(["format_text:a"]);
    actions.undo();
    expect(getState().history.present.edges.map((edge) => edge.id)).toEqual(["sum:a"]);
  });

  it("moves a pulled link to another input, or joins a link let go on a node to its first free fitting input", () => {
    const edge = getState().history.present.edges[0];
    actions.moveLink(edge, { source: "seed", sourceHandle: "value", target: "sum", targetHandle: "b" });
    expect(getState().history.present.edges.map((e) => e.id)).toEqual(["sum:b"]);
    expect(actions.linkToNode({ from: "output", type: "INT", nodeId: "seed", socket: "value" }, "sum")).toBe(true);
    expect(getState().history.present.edges.map((e) => e.id)).toEqual(["sum:b", "sum:a"]);
    // Nothing on Integer takes a FLOAT from sum... its value input is INT, which FLOAT cannot feed.
    expect(actions.linkToNode({ from: "output", type: "FLOAT", nodeId: "sum", socket: "result" }, "seed")).toBe(false);
  });

  it("steps the image viewer through a batch and opens the workflow of the run that made it", async () => {
    actions.openViewer(["/a.png", "/b.png", "/c.png"], 5, "run-1");
    expect(getState().viewer).toEqual({ images: ["/a.png", "/b.png", "/c.png"], index: 2, runId: "run-1" });
    actions.stepViewer(1);
    expect(getState().viewer?.index).toBe(0);
    actions.stepViewer(-1);
    expect(getState().viewer?.index).toBe(2);
    const ran = { version: 1, nodes: { only: { type: "Integer", inputs: { value: 42 } } } };
    stubServer({ "GET /api/runs/run-1": () => ({ id: "run-1", status: "succeeded", workflow: ran }),
                 "GET /api/runs/gone": () => [404, { error: "unknown_run", message: "no run gone" }] });
    await actions.openRunWorkflow("run-1");
    expect(graphToWorkflow(getState().history.present).nodes).toEqual(ran.nodes);
    expect(getState().viewer).toBeNull();
    await actions.openRunWorkflow("gone");
    expect(getState().message).toEqual({ text: "cannot open the workflow of run gone: no run gone", error: true });
  });

  it("queues the graph several times at once, re-rolling seeds marked random between the runs", async () => {
    const rolls = [0.1, 0.5, 0.9];
    vi.spyOn(Math, "random").mockImplementation(() => rolls.shift() ?? 0);
    let n = 0;
    const seen = stubServer({ "POST /api/runs": () => [201, { id: `batch-${++n}`, status: "queued" }] });
    actions.setBatchCount(3);
    actions.setBatchCount(0);  // refused: stays 3
    await actions.run();
    const seeds = seen.filter((r) => r.method === "POST").map((r) => (r.body as { workflow: WorkflowDocument }).workflow.nodes.seed.inputs.value);
    expect(seeds).toEqual([5, 1, 5]);  // as loaded, then 0.1 -> 1, then 0.5 -> 5 (0.9 -> 9 is for the next run)
    expect(values("seed")?.value).toBe(9);
    vi.restoreAllMocks();
    expect(getState().message?.text).toBe("queued 3 runs");
    actions.setBatchCount(1);
  });

  it("reads each listed run's prompt once, from the server's list of runs, an older run on its own", async () => {
    const list = { runs: [{ id: "new-1", status: "succeeded", prompt: "a cat" }, { id: "new-2", status: "failed", prompt: null }],
                   queued: [], running: null, paused: false };
    const seen = stubServer({ "GET /api/runs?limit=50": () => list,
                              "GET /api/runs/old": () => ({ id: "old", status: "succeeded", prompt: "a dog", workflow: {} }) });
    await actions.loadRunInfo(["new-1", "new-2", "old"]);
    await actions.loadRunInfo(["new-1", "new-2", "old"]);
    expect(getState().runInfo).toMatchObject({ "new-1": { prompt: "a cat" }, "new-2": { prompt: null }, old: { prompt: "a dog" } });
    expect(seen.map((r) => r.path)).toEqual(["/api/runs?limit=50", "/api/runs/old"]);
  });

  it("deletes a run from the server's history, and says why the server refuses one", async () => {
    for (const event of [{ type: "run_queued", run_id: "done", node_id: null }, { type: "run_finished", run_id: "done", node_id: null },
                         { type: "run_queued", run_id: "busy", node_id: null }]) actions.event(event);
    const seen = stubServer({
      "DELETE /api/runs/done": () => ({ id: "done", deleted: true }),
      "DELETE /api/runs/busy": () => [409, { error: "run_not_finished", message: "run busy is queued: cancel it first",
                                             status: "queued" }],
    });
    await actions.deleteRun("done");
    expect(seen.map((r) => `${r.method} ${r.path}`)).toEqual(["DELETE /api/runs/done"]);
    expect(getState().runs.runs.done).toBeUndefined();
    expect(getState().runs.order).not.toContain("done");
    await actions.deleteRun("busy");
    expect(getState().runs.runs.busy?.status).toBe("queued");
    expect(getState().message).toEqual({ text: "cannot delete run busy: run busy is queued: cancel it first", error: true });
    // Another page's deletion arrives as an event.
    actions.event({ type: "run_deleted", run_id: "busy", node_id: null });
    expect(getState().runs.runs.busy).toBeUndefined();
  });

  it("says why a link dropped on a socket was refused", () => {
    actions.explainRefusedLink({ source: "sum", sourceHandle: "result", target: "seed", targetHandle: "value" });
    expect(getState().message).toEqual({ text: "cannot connect: FLOAT cannot feed INT", error: true });
    actions.explainRefusedLink({ source: "sum", sourceHandle: "result", target: "seed", targetHandle: "value" }, true);
    expect(getState().message?.text).toBe("cannot connect: a link goes from an output to an input");
  });

  it("copies, pastes and deletes the selection", () => {
    actions.nodesChanged([{ type: "select", id: "seed", selected: true }, { type: "select", id: "sum", selected: true }]);
    actions.copy();
    actions.paste();
    const ids = getState().history.present.nodes.map((node) => node.id);
    expect(ids).toEqual(["seed", "sum", "integer", "math"]);
    expect(getState().history.present.edges.map((edge) => edge.id)).toEqual(["sum:a", "math:a"]);
    actions.deleteSelected();  // the pasted nodes are the selection now
    expect(getState().history.present.nodes.map((node) => node.id)).toEqual(["seed", "sum"]);
    actions.undo();
    expect(getState().history.present.nodes).toHaveLength(4);
  });

  it("re-rolls seeds marked random after a run, within bounds", () => {
    const seen = new Set<unknown>();
    for (let i = 0; i < 30; i++) {
      actions.randomizeSeeds();
      const value = values("seed")?.value as number;
      expect(value).toBeGreaterThanOrEqual(0);
      expect(value).toBeLessThanOrEqual(9);
      seen.add(value);
    }
    expect(seen.size).toBeGreaterThan(1);
    actions.setRandomize("seed", "value", false);
    const fixed = values("seed")?.value;
    actions.randomizeSeeds();
    expect(values("seed")?.value).toBe(fixed);
  });

  it("shows previews, then images, on the node that made them", async () => {
    stubServer({ "POST /api/runs": () => [201, { id: "r", status: "queued" }] });
    await actions.run();
    actions.event({ type: "node_preview", run_id: "r", node_id: "sum", image: "data:image/jpeg;base64,AA" });
    expect(getState().media.sum).toMatchObject({ src: "data:image/jpeg;base64,AA", kind: "preview" });
    actions.event({ type: "node_finished", run_id: "r", node_id: "sum", files: ["o/x.png"],
                    file_urls: ["/api/files/outputs/x.png"] });
    expect(getState().media.sum).toMatchObject({ src: "/api/files/outputs/x.png", kind: "image", images: ["/api/files/outputs/x.png"] });
  });

  it("reads the runs from the server when the event stream (re)connects, as after a page reload", async () => {
    const storage = stubStorage();
    stubServer({
      "GET /api/runs?limit=50": () => ({
        runs: [
          { id: "done", status: "succeeded", seconds: 2, files: ["/o/done.png"], file_urls: ["/api/files/outputs/done.png"],
            prompt: "a red circle",
            nodes: { seed: { status: "cached" }, sum: { status: "executed", files: ["/o/done.png"],
                                                        file_urls: ["/api/files/outputs/done.png"] } } },
          { id: "broken", status: "failed", nodes: { sum: { status: "failed" } }, files: [],
            error: { node_id: "sum", exception: "ValueError", message: "bad" } },
          { id: "busy", status: "running", nodes: {}, files: [] },
          { id: "next", status: "queued", nodes: {}, files: [] },
        ],
        queued: ["next"], queued_count: 1, running: "busy", running_ids: ["busy"], paused: false,
      }),
      "GET /api/runs/busy": () => ({ id: "busy", status: "running", files: [],
                                     nodes: { seed: { status: "cached" }, sum: { status: "running", progress: [3, 4] } } }),
    });
    // The graph on the canvas submitted "busy" before the reload.
    storage.set("nodegraph.runGraphs", JSON.stringify([["busy", getState().graphId]]));
    const resynced = actions.setConnected(true);
    // An event arriving while the runs are read is not lost.
    actions.event({ type: "node_progress", run_id: "busy", node_id: "sum", value: 4, max: 4 });
    await resynced;
    const { runs } = getState();
    expect(runs.order).toEqual(["done", "broken", "busy", "next"]);
    expect(runs.runs.done).toMatchObject({ status: "succeeded", images: ["/api/files/outputs/done.png"], seconds: 2 });
    expect(runs.runs.broken).toMatchObject({ status: "failed", error: "sum: ValueError bad" });
    expect(runs.runs.busy).toMatchObject({ status: "running", currentNode: "sum" });
    expect(runs.runs.busy.nodes.sum.progress).toEqual([4, 4]);
    expect(runs.runs.next.status).toBe("queued");
    expect(runs.queue).toEqual({ queued: ["next"], running: "busy", paused: false });
    // The run in progress is the canvas's own: its nodes show it.
    expect(getState().nodeRuns.sum).toMatchObject({ status: "running", progress: [4, 4] });
    // The prompts come with the list: the history needs no request per run.
    expect(getState().runInfo.done).toEqual({ prompt: "a red circle" });
    expect(getState().runInfo.broken).toEqual({ prompt: null });
  });

  it("shows a run on the graph it was submitted from only", async () => {
    stubServer({ "POST /api/runs": () => [201, { id: "mine", status: "queued" }] });
    // A run submitted elsewhere (another tab, the CLI) paints nothing here, though its node ids match.
    actions.event({ type: "run_started", run_id: "theirs", node_id: null, nodes: ["seed", "sum"] });
    actions.event({ type: "node_started", run_id: "theirs", node_id: "sum", node_type: "Math" });
    actions.event({ type: "node_preview", run_id: "theirs", node_id: "sum", image: "data:image/jpeg;base64,XX" });
    actions.event({ type: "node_finished", run_id: "theirs", node_id: "seed", files: [],
                    file_urls: ["/api/files/outputs/theirs.png"] });
    expect(getState().media).toEqual({});
    expect(getState().nodeRuns).toEqual({});
    expect(getState().runs.order).toContain("theirs");  // the queue panel lists every run

    await actions.run();
    actions.event({ type: "run_started", run_id: "mine", node_id: null, nodes: ["seed", "sum"] });
    actions.event({ type: "node_finished", run_id: "mine", node_id: "sum", files: [],
                    file_urls: ["/api/files/outputs/mine.png"] });
    expect(getState().media).toEqual({ sum: { src: "/api/files/outputs/mine.png", kind: "image", runId: "mine",
                                              images: ["/api/files/outputs/mine.png"] } });
    expect(getState().nodeRuns.sum.status).toBe("executed");
    expect(getState().nodeRuns.seed.status).toBe("pending");

    // Another workflow with the same node ids shows none of it; reopening the first does not either
    // (a loaded document is a new graph), but undoing edits keeps the graph and its runs.
    actions.setValue("sum", "b", 3);
    actions.undo();
    expect(getState().nodeRuns.sum.status).toBe("executed");
    actions.load(structuredClone(workflow), "other.json");
    expect(getState().media).toEqual({});
    expect(getState().nodeRuns).toEqual({});
  });
});
