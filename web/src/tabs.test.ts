import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { graphToWorkflow } from "./graph";
import { actions, getState } from "./store";
import { catalogue } from "./testCatalogue";
import { stubServer, stubStorage } from "./testServer";

const workflow = (value: number) => ({ version: 1, nodes: { seed: { type: "Integer", inputs: { value } } },
                                       ui: { nodes: { seed: { pos: [0, 0] } } } });
const seed = () => graphToWorkflow(getState().history.present).nodes.seed?.inputs.value;
const names = () => getState().tabs.map((tab, i) => i === getState().activeTab ? getState().workflowName : tab.workflowName);

describe("workflow tabs", () => {
  let storage: Map<string, string>;
  beforeEach(() => {
    storage = stubStorage();
    actions.setCatalogue(catalogue);
    // Start from one fresh tab.
    actions.newTab();
    while (getState().tabs.length > 1) actions.closeTab(0);
    actions.load(workflow(1), "one.json");
  });

  afterEach(() => vi.unstubAllGlobals());

  it("opens a workflow in a new tab once the open one is edited, each with its own undo history", () => {
    actions.load(workflow(2), "two.json");  // one.json untouched: replaced
    expect(names()).toEqual(["two.json"]);
    actions.setValue("seed", "value", 20);
    actions.load(workflow(3), "three.json");
    expect(names()).toEqual(["two.json", "three.json"]);
    expect(getState().activeTab).toBe(1);
    actions.setValue("seed", "value", 30);
    actions.switchTab(0);
    expect(seed()).toBe(20);
    actions.undo();
    expect(seed()).toBe(2);
    actions.switchTab(1);
    expect(seed()).toBe(30);  // the other tab's undo did not touch this one
    actions.undo();
    expect(seed()).toBe(3);
    expect(getState().history.past).toHaveLength(0);
  });

  it("shows each tab its own runs", async () => {
    stubServer({ "POST /api/runs": () => [201, { id: "from-one", status: "queued" }] });
    await actions.run();
    actions.event({ type: "node_finished", run_id: "from-one", node_id: "seed", files: [], file_urls: ["/api/files/outputs/1.png"] });
    expect(getState().media.seed?.src).toBe("/api/files/outputs/1.png");
    actions.newTab();
    actions.load(workflow(5), "five.json");  // into the new, empty tab
    expect(names()).toEqual(["one.json", "five.json"]);
    expect(getState().media).toEqual({});
    actions.switchTab(0);
    expect(getState().media.seed?.src).toBe("/api/files/outputs/1.png");
  });

  it("reopens every tab after a reload, and closes tabs", async () => {
    actions.setValue("seed", "value", 11);
    actions.newTab();
    actions.load(workflow(7), "seven.json");
    const before = getState().tabs.map((tab, i) => i === getState().activeTab ? getState().graphId : tab.graphId);
    const stored = JSON.parse(storage.get("nodegraph.tabs") as string);
    expect(stored.tabs.map((tab: { name: string }) => tab.name)).toEqual(["one.json", "seven.json"]);
    expect(stored.tabs[0].workflow.nodes.seed.inputs.value).toBe(11);

    // A reload: the page starts again from what is stored.
    actions.switchTab(0);
    stubServer({ "GET /api/nodes": () => catalogue, "GET /api/workflows": () => ({ workflows: [] }) });
    await actions.loadInitialGraph();
    expect(names()).toEqual(["one.json", "seven.json"]);
    expect(getState().tabs.map((tab, i) => i === getState().activeTab ? getState().graphId : tab.graphId)).toEqual(before);
    expect(getState().activeTab).toBe(0);
    expect(seed()).toBe(11);

    actions.closeTab(0);
    expect(names()).toEqual(["seven.json"]);
    expect(seed()).toBe(7);
    actions.closeTab(0);  // the last one: an empty tab stays
    expect(names()).toEqual(["untitled.json"]);
    expect(getState().history.present.nodes).toEqual([]);
  });

  it("opens a past run's workflow in a new tab, never over the open graph, unless that is blank", async () => {
    const ran = { version: 1, nodes: { seed: { type: "Integer", inputs: { value: 99 } } } };
    stubServer({ "GET /api/runs/run-1": () => ({ id: "run-1", status: "succeeded", workflow: ran }) });
    // one.json as opened, unchanged: a workflow opened from the list would replace it, a run's does not.
    await actions.openRunWorkflow("run-1");
    expect(names()).toEqual(["one.json", "run-run-1.json"]);
    expect(seed()).toBe(99);
    expect(getState().message?.text).toBe("opened the workflow of run run-1 in a new tab");
    actions.switchTab(0);
    expect(seed()).toBe(1);
    // A blank tab (+) takes it.
    actions.newTab();
    await actions.openRunWorkflow("run-1");
    expect(names()).toEqual(["one.json", "run-run-1.json", "run-run-1.json"]);
    expect(getState().activeTab).toBe(2);
    expect(getState().message?.text).toBe("opened the workflow of run run-1");
    // A canvas emptied by hand still has its undo history: not blank.
    actions.deleteNodes(["seed"]);
    await actions.openRunWorkflow("run-1");
    expect(names()).toHaveLength(4);
    actions.switchTab(2);
    expect(seed()).toBeUndefined();
    actions.undo();  // what was there comes back
    expect(seed()).toBe(99);
  });

  it("keeps knowing, across a reload, that a tab was changed, so a workflow opened later does not replace it", async () => {
    actions.setValue("seed", "value", 12);
    const stored = JSON.parse(storage.get("nodegraph.tabs") as string);
    expect(stored.tabs[0].edited).toBe(true);
    // A reload: the undo history is gone, the change is not forgotten.
    stubServer({ "GET /api/nodes": () => catalogue, "GET /api/workflows": () => ({ workflows: [] }) });
    await actions.loadInitialGraph();
    expect(getState().history.past).toHaveLength(0);
    actions.load(workflow(4), "four.json");
    expect(names()).toEqual(["one.json", "four.json"]);
    actions.switchTab(0);
    expect(seed()).toBe(12);
  });
});
