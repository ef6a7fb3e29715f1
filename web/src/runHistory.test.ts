import { describe, expect, it } from "vitest";

import { runTime } from "./runHistory";
import { applyEvent, emptyRuns, runFromApi } from "./runState";

describe("the history of runs", () => {
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
