import { describe, expect, it } from "vitest";

import { REROUTE_RADIUS } from "./canvasElements";
import { type Graph, workflowToGraph } from "./graph";
import { FIT_MAX_ZOOM, fitViewport, graphBounds, MIN_ZOOM, type Viewport } from "./viewport";
import type { Box } from "./uiElements";

/** A graph read from a document, its nodes measured by React Flow at `sizes` (id -> [width, height]). */
function measured(document: object, sizes: Record<string, [number, number]>): Graph {
  const graph = workflowToGraph(document);
  return { ...graph, nodes: graph.nodes.map((node) => sizes[node.id] === undefined ? node
    : { ...node, measured: { width: sizes[node.id][0], height: sizes[node.id][1] } }) };
}

/** Where a canvas box is drawn on screen under `view`. */
function onScreen(box: Box, view: Viewport): Box {
  return { x: box.x * view.zoom + view.x, y: box.y * view.zoom + view.y, width: box.width * view.zoom, height: box.height * view.zoom };
}

const integer = { type: "Integer", inputs: { value: 1 } };

describe("the box around a graph", () => {
  it("holds every node at its measured size, groups, notes and reroute points", () => {
    const graph = measured({
      version: 1,
      nodes: { a: integer, b: integer, c: { type: "Math", inputs: { a: { from: "a", output: "value" } } } },
      ui: { nodes: { a: { pos: [100, 50] }, b: { pos: [900, 300] }, c: { pos: [400, 100] } },
            groups: [{ id: "g", title: "left", color: "#3f789e", bounds: [-300, 0, 200, 100] }],
            notes: [{ id: "n", text: "low", pos: [0, 1000], size: [150, 60] }],
            reroutes: [{ id: "r", pos: [1500, 40], to: { node: "c", input: "a" } }] },
    }, { a: [240, 90], b: [310, 400] });
    // b: 900 + 310 wide, 300 + 400 tall; c unmeasured: the default 240 x 120; the reroute point's circle.
    expect(graphBounds(graph)).toEqual({ x: -300, y: 0, width: 1500 + REROUTE_RADIUS + 300, height: 1060 });
  });

  it("is the nodes' own box when there is nothing else, and none for an empty graph", () => {
    const graph = measured({ version: 1, nodes: { a: integer, b: integer },
                             ui: { nodes: { a: { pos: [10, 20] }, b: { pos: [4010, 220] } } } },
                           { a: [240, 100], b: [250, 130] });
    expect(graphBounds(graph)).toEqual({ x: 10, y: 20, width: 4250, height: 330 });
    expect(graphBounds(workflowToGraph({ version: 1, nodes: {} }))).toBeNull();
  });
});

describe("the view a workflow opens at", () => {
  it("shows a small graph at its size, centred, never zoomed in", () => {
    expect(fitViewport({ x: 100, y: 50, width: 400, height: 200 }, 1000, 800, 40)).toEqual({ x: 200, y: 250, zoom: FIT_MAX_ZOOM });
  });

  it("zooms a graph wider than the view out until all of it fits, with the margin, centred", () => {
    const graph = { x: -200, y: 100, width: 4000, height: 600 };
    const view = fitViewport(graph, 1200, 800, 40);
    expect(view.zoom).toBeCloseTo((1200 - 80) / 4000);
    const drawn = onScreen(graph, view);
    expect(drawn.x).toBeCloseTo(40);
    expect(drawn.x + drawn.width).toBeCloseTo(1200 - 40);
    expect(drawn.y + drawn.height / 2).toBeCloseTo(400);  // the height fits: centred
  });

  it("zooms a graph taller than the view out until all of it fits, centred across", () => {
    const graph = { x: 0, y: -1000, width: 500, height: 3000 };
    const view = fitViewport(graph, 1200, 800, 40);
    expect(view.zoom).toBeCloseTo(720 / 3000);
    const drawn = onScreen(graph, view);
    expect(drawn.y).toBeCloseTo(40);
    expect(drawn.y + drawn.height).toBeCloseTo(760);
    expect(drawn.x + drawn.width / 2).toBeCloseTo(600);
  });

  it("goes no further out than the canvas can: a graph too big even then shows its top-left part", () => {
    const graph = { x: 40, y: -20, width: 100_000, height: 500 };
    const view = fitViewport(graph, 1000, 800, 40);
    expect(view.zoom).toBe(MIN_ZOOM);
    const drawn = onScreen(graph, view);
    expect(drawn.x).toBeCloseTo(40);
    expect(drawn.y + drawn.height / 2).toBeCloseTo(400);
  });

  it("takes a single point (one reroute left) as fitting at full size", () => {
    expect(fitViewport({ x: 10, y: 10, width: 0, height: 0 }, 1000, 800, 40)).toEqual({ x: 490, y: 390, zoom: 1 });
  });
});
