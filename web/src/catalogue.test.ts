import { describe, expect, it } from "vitest";

import { canConnect, type InputSpec, numberProblem, paletteGroups, randomSeed, widgetFor } from "./catalogue";
import { catalogue } from "./testCatalogue";

const input = (spec: Partial<InputSpec>): InputSpec => ({ type: "INT", required: false, description: "", link_only: false, ...spec });

describe("canConnect", () => {
  it("follows the server's accepts lists and the any type", () => {
    expect(canConnect(catalogue, "INT", "FLOAT")).toBe(true);
    expect(canConnect(catalogue, "FLOAT", "INT")).toBe(false);
    expect(canConnect(catalogue, "STRING", "IMAGE")).toBe(false);
    expect(canConnect(catalogue, "IMAGE", "*")).toBe(true);
    expect(canConnect(catalogue, "NEW_TYPE", "NEW_TYPE")).toBe(true);
  });
});

describe("widgetFor", () => {
  it("derives widgets from the schema", () => {
    expect(widgetFor("steps", input({ ge: 1, le: 150 }))).toEqual({ kind: "number", integer: true, min: 1, max: 150, step: 1 });
    expect(widgetFor("seed", input({ ge: 0 }))).toEqual({ kind: "seed", min: 0, max: 2 ** 32 - 1 });
    expect(widgetFor("cfg", input({ type: "FLOAT", ge: 0, le: 30, multiple_of: 0.5 })))
      .toEqual({ kind: "number", integer: false, min: 0, max: 30, step: 0.5 });
    expect(widgetFor("text", input({ type: "STRING", multiline: true }))).toEqual({ kind: "text", multiline: true });
    expect(widgetFor("name", input({ type: "STRING", choices: ["a.safetensors"], choices_kind: "checkpoints" })))
      .toEqual({ kind: "choice", options: ["a.safetensors"], model: true });
    expect(widgetFor("image", input({ type: "STRING", choices: ["cat.png"], choices_kind: "inputs" })))
      .toEqual({ kind: "image", options: ["cat.png"] });
    expect(widgetFor("flag", input({ type: "BOOLEAN" }))).toEqual({ kind: "boolean" });
    expect(widgetFor("model", input({ type: "MODEL", link_only: true }))).toEqual({ kind: "none" });
    expect(widgetFor("a", input({ type: "*" }))).toEqual({ kind: "json" });
  });

  it("says why a number does not fit, without changing it", () => {
    const width = { kind: "number", integer: true, min: 16, max: 2048, step: 8 } as const;
    expect(numberProblem(width, 64)).toBeNull();
    expect(numberProblem(width, 8)).toBe("at least 16");
    expect(numberProblem(width, 4096)).toBe("at most 2048");
    expect(numberProblem(width, 515)).toBe("a multiple of 8");
    expect(numberProblem(width, 64.5)).toBe("a whole number is needed");
    expect(numberProblem({ kind: "number", integer: false, step: 0.1 }, 1.234)).toBeNull();
    expect(numberProblem({ kind: "seed", min: 0, max: 9 }, 10)).toBe("at most 9");
  });

  it("draws random seeds inside the bounds", () => {
    const seed = { kind: "seed", min: 10, max: 12 } as const;
    expect(randomSeed(seed, () => 0)).toBe(10);
    expect(randomSeed(seed, () => 0.9999)).toBe(12);
  });
});

describe("paletteGroups", () => {
  it("groups by category and searches names and descriptions", () => {
    expect(paletteGroups(catalogue, "").map(([category, specs]) => [category, specs.map((s) => s.type)]))
      .toEqual([["basic", ["FormatText", "Integer", "Math"]], ["image", ["SaveImage"]]]);
    expect(paletteGroups(catalogue, "arithmetic")[0][1].map((s) => s.type)).toEqual(["Math"]);
    expect(paletteGroups(catalogue, "nothing like this")).toEqual([]);
  });
});
