import { describe, expect, it } from "vitest";

import { fitViewport, READABLE_ZOOM } from "./viewport";

describe("the opening view", () => {
  it("centres a graph that fits, never zooming in past 1", () => {
    expect(fitViewport({ x: 100, y: 50, width: 400, height: 200 }, 1000, 800)).toEqual({ x: 200, y: 250, zoom: 1 });
  });

  it("zooms out to fit, down to a readable zoom", () => {
    const view = fitViewport({ x: 0, y: 0, width: 1100, height: 400 }, 1000, 800, 0);
    expect(view.zoom).toBeCloseTo(1000 / 1100);
    expect(view.x).toBeCloseTo(0);
  });

  it("shows the top-left of a graph too big to read whole", () => {
    const view = fitViewport({ x: 40, y: -20, width: 3000, height: 2000 }, 1000, 800, 24);
    expect(view.zoom).toBe(READABLE_ZOOM);
    expect(view.x).toBeCloseTo(24 - 40 * READABLE_ZOOM);
    expect(view.y).toBeCloseTo(24 + 20 * READABLE_ZOOM);
  });
});
