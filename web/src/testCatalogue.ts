// A small catalogue shaped like GET /api/nodes, for the unit tests.

import type { Catalogue, InputSpec } from "./catalogue";

const input = (spec: Partial<InputSpec>): InputSpec => ({ type: "INT", required: false, description: "", link_only: false, ...spec });

export const catalogue: Catalogue = {
  types: {
    INT: { description: "", color: "#29b6f6", accepts: [] },
    FLOAT: { description: "", color: "#66bb6a", accepts: ["INT"] },
    STRING: { description: "", color: "#ffca28", accepts: [] },
    IMAGE: { description: "", color: "#64b5f6", accepts: [] },
    "*": { description: "", color: "#fff", accepts: [] },
  },
  nodes: {
    Integer: { type: "Integer", display_name: "Integer", category: "basic", description: "A whole number.", version: 1,
               output_node: false, deprecated: false, pack: "basic", aliases: [],
               inputs: { value: input({ default: 0 }) }, outputs: { value: { type: "INT", description: "" } } },
    Math: { type: "Math", display_name: "Math", category: "basic", description: "Arithmetic on two numbers.", version: 1,
            output_node: false, deprecated: false, pack: "basic", aliases: [],
            inputs: { a: input({ type: "FLOAT", default: 0 }), b: input({ type: "FLOAT", default: 0 }),
                      operation: input({ type: "ENUM", choices: ["add", "subtract"], default: "add" }) },
            outputs: { result: { type: "FLOAT", description: "" } } },
    FormatText: { type: "FormatText", display_name: "Format Text", category: "basic", description: "Fill a template.",
                  version: 1, output_node: false, deprecated: false, pack: "basic", aliases: [],
                  inputs: { template: input({ type: "STRING", default: "{a}" }), a: input({ type: "*" }) },
                  outputs: { text: { type: "STRING", description: "" } } },
    SaveImage: { type: "SaveImage", display_name: "Save Image", category: "image", description: "Write PNGs.", version: 1,
                 output_node: true, deprecated: false, pack: "diffusion", aliases: ["SaveImage"],
                 inputs: { images: input({ type: "IMAGE", required: true, link_only: true }) }, outputs: {} },
  },
};
