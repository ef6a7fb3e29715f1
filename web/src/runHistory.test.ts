import { describe, expect, it } from "vitest";

import { promptOf, runTime } from "./runHistory";
import { applyEvent, emptyRuns, runFromApi } from "./runState";
import { catalogue } from "./testCatalogue";

const multiline = structuredClone(catalogue);
multiline.nodes.FormatText.inputs.template = { ...multiline.nodes.FormatText.inputs.template, multiline: true };

describe("the history of runs", () => {
  it("takes a run's prompt from the first non-empty multi-line text of its workflow", () => {
    const workflow = { version: 1, nodes: {
      seed: { type: "Integer", inputs: { value: 1 } },
      negative: { type: "FormatText", inputs: { template: "  " } },
      linked: { type: "FormatText", inputs: { template: { from: "seed", output: "value" } } },
      prompt: { type: "FormatText", inputs: { template: "a red circle" } },
      later: { type: "FormatText", inputs: { template: "not this" } },
    } };
    expect(promptOf(workflow, multiline)).toBe("a red circle");
    expect(promptOf(workflow, catalogue)).toBeNull();  // single-line text is not a prompt
    expect(promptOf({ nodes: { x: { type: "Unknown", inputs: { template: "t" } } } }, multiline)).toBeNull();
    expect(promptOf(undefined, multiline)).toBeNull();
  });

  it("shows today's runs by the time of day, older ones with their date", () => {
    const now = new Date(2026, 11, 24, 18, 0);
    expect(runTime(new Date(2026, 11, 24, 9, 5).getTime() / 1000, now)).toBe("09:05");
    expect(runTime(new Date(2026, 10, 2, 23, 59).getTime() / 1000, now)).toBe("2026-11-02 23:59");
  });

  it("keeps when a run was queued and ended, from events and from the API", () => {
    const runs = [{ type: "run_queued", run_id: "r", node_id: null, time: 100 },
                  { type: "run_finished", run_id: "r", node_id: null, time: 107.5, seconds: 7 }].reduce(applyEvent, emptyRuns);
    expect(runs.runs.r).toMatchObject({ created: 100, finished: 107.5, seconds: 7 });
    expect(runFromApi({ id: "s", status: "failed", created: 5, finished: 9 })).toMatchObject({ created: 5, finished: 9 });
  });
});
