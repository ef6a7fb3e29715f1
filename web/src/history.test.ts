import { describe, expect, it } from "vitest";

import { HISTORY_LIMIT, record, redo, replace, startHistory, undo } from "./history";

describe("history", () => {
  it("undoes and redoes, and a new edit drops the redo branch", () => {
    let history = record(record(startHistory("a"), "b"), "c");
    history = undo(undo(history));
    expect(history.present).toBe("a");
    history = redo(history);
    expect(history.present).toBe("b");
    history = record(history, "d");
    expect(redo(history).present).toBe("d");
    expect(undo(history).present).toBe("b");
    expect(undo(undo(undo(history))).present).toBe("a");
  });

  it("replace changes the present without an undo step, and the past is bounded", () => {
    const history = replace(record(startHistory(0), 1), 2);
    expect(undo(history).present).toBe(0);
    let long = startHistory(0);
    for (let i = 1; i <= HISTORY_LIMIT + 20; i++) long = record(long, i);
    expect(long.past).toHaveLength(HISTORY_LIMIT);
  });
});
