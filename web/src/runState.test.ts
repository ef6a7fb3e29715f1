import { describe, expect, it } from "vitest";

import { applyEvent, emptyRuns, issuesByNode, runProgress, type RunsState, type ServerEvent } from "./runState";

const event = (type: string, node_id: string | null, fields: Record<string, unknown> = {}): ServerEvent =>
  ({ type, run_id: "r1", node_id, ...fields });

const fold = (events: ServerEvent[]): RunsState => events.reduce(applyEvent, emptyRuns);

describe("run state", () => {
  it("follows a run through its events", () => {
    const started = fold([
      event("run_queued", null),
      { type: "queue_changed", run_id: "", node_id: null, queued: [], running: "r1", paused: false },
      event("run_started", null, { nodes: ["load", "sample", "save"] }),
      event("node_cached", "load", { files: [], file_urls: [] }),
      event("node_started", "sample", { node_type: "Sample" }),
      event("node_progress", "sample", { value: 5, max: 10 }),
      event("node_preview", "sample", { image: "data:image/jpeg;base64,AAA", width: 8, height: 8 }),
    ]);
    const run = started.runs.r1;
    expect(run.status).toBe("running");
    expect(run.currentNode).toBe("sample");
    expect(run.nodes.sample).toMatchObject({ status: "running", progress: [5, 10], preview: "data:image/jpeg;base64,AAA" });
    expect(runProgress(run)).toBeCloseTo((1 + 0.5) / 3);
    expect(started.queue.running).toBe("r1");

    const done = [
      event("node_finished", "sample", { seconds: 1, files: [], file_urls: [] }),
      event("node_started", "save", { node_type: "SaveImage" }),
      event("node_finished", "save", { seconds: 0.1, files: ["/o/a.png", "/o/a.txt"],
                                       file_urls: ["/api/files/outputs/a.png", "/api/files/outputs/a.txt"] }),
      event("run_finished", null, { seconds: 2 }),
    ].reduce(applyEvent, started);
    expect(done.runs.r1.status).toBe("succeeded");
    expect(done.runs.r1.currentNode).toBeNull();
    expect(done.runs.r1.images).toEqual(["/api/files/outputs/a.png"]);
    expect(done.runs.r1.nodes.save.images).toEqual(["/api/files/outputs/a.png"]);
    expect(runProgress(done.runs.r1)).toBe(1);
    expect(done.order).toEqual(["r1"]);
  });

  it("records failures and cancellations on the node", () => {
    const failed = fold([
      event("run_started", null, { nodes: ["x"] }), event("node_started", "x"),
      event("node_failed", "x", { exception: "ValueError", message: "bad" }),
      event("run_failed", "x", { error: { node_id: "x", exception: "ValueError", message: "bad" } }),
    ]);
    expect(failed.runs.r1.nodes.x).toMatchObject({ status: "failed", error: "ValueError: bad" });
    expect(failed.runs.r1.error).toBe("x: ValueError bad");
    const cancelled = fold([event("run_started", null, { nodes: ["x"] }), event("node_started", "x"), event("run_cancelled", null)]);
    expect(cancelled.runs.r1.nodes.x.status).toBe("cancelled");
    expect(fold([event("something_new", null)])).toBe(emptyRuns);
  });

  it("shows a run seen only from the middle (after a reload) as running", () => {
    const midway = fold([event("node_progress", "sample", { value: 3, max: 10 })]);
    expect(midway.runs.r1.status).toBe("running");
    expect(midway.runs.r1.currentNode).toBe("sample");
    const announced = fold([{ type: "queue_changed", run_id: "", node_id: null, queued: [], running: "r1", paused: false }]);
    expect(announced.runs.r1.status).toBe("running");
  });

  it("groups validation issues by node and input", () => {
    expect(issuesByNode([
      { code: "out_of_bounds", message: "too big", node_id: "a", input: "value" },
      { code: "missing_input", message: "needed", node_id: "a", input: "other" },
      { code: "no_output", message: "no output node", node_id: null, input: null },
    ])).toEqual({ a: { value: ["too big"], other: ["needed"] }, "": { "": ["no output node"] } });
  });

  it("forgets a run deleted from the server's history, once", () => {
    const two = fold([event("run_queued", null), { type: "run_queued", run_id: "r2", node_id: null },
                      event("run_finished", null, { seconds: 1 })]);
    const deleted = applyEvent(two, event("run_deleted", null));
    expect(deleted.order).toEqual(["r2"]);
    expect(Object.keys(deleted.runs)).toEqual(["r2"]);
    expect(applyEvent(deleted, event("run_deleted", null))).toBe(deleted);  // seen again (a resync): no change
  });
});
