import { describe, expect, it } from "vitest";

import type { Catalogue, InputSpec, NodeTypeSpec } from "./catalogue";
import { linkSocket, nodeUsage, searchNodes } from "./nodeSearch";

const link = (type: string): InputSpec => ({ type, required: true, description: "", link_only: true });
const value = (type: string): InputSpec => ({ type, required: false, description: "", link_only: false });

function node(type: string, display: string, description: string, inputs: Record<string, InputSpec>,
              outputs: Record<string, string>, extra: Partial<NodeTypeSpec> = {}): NodeTypeSpec {
  return { type, display_name: display, category: "sampling", description, version: 1, output_node: false,
           deprecated: false, pack: "diffusion", aliases: [], inputs,
           outputs: Object.fromEntries(Object.entries(outputs).map(([name, t]) => [name, { type: t, description: "" }])),
           ...extra };
}

// Shaped like the diffusion pack's nodes, by their real type names, with the ComfyUI names GET /api/nodes
// lists as their aliases.
const catalogue: Catalogue = {
  types: Object.fromEntries(["MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "INT", "STRING", "*"]
    .map((t) => [t, { description: "", color: "#fff", accepts: [] }])),
  nodes: Object.fromEntries([
    node("LoadCheckpoint", "Load Checkpoint", "Load a checkpoint file.", { name: value("STRING") },
         { model: "MODEL", clip: "CLIP", vae: "VAE" }, { aliases: ["CheckpointLoaderSimple"] }),
    node("TextEncode", "Text Encode", "Encode a prompt into conditioning.", { clip: link("CLIP"), text: value("STRING") },
         { conditioning: "CONDITIONING" }, { aliases: ["CLIPTextEncode"] }),
    node("KSampler", "K Sampler", "Denoise a latent.", { model: link("MODEL"), positive: link("CONDITIONING"),
         negative: link("CONDITIONING"), latent: link("LATENT"), seed: value("INT") }, { latent: "LATENT" },
         { aliases: ["KSampler"] }),
    node("EmptyLatent", "Empty Latent", "An all-zero latent batch to start text-to-image from.",
         { model: link("MODEL"), width: value("INT") }, { latent: "LATENT" },
         { aliases: ["EmptyLatentImage", "EmptySD3LatentImage"] }),
    node("LoadLora", "Load Lora", "Apply a LoRA to the model and text encoder.", { model: link("MODEL"), clip: link("CLIP") },
         { model: "MODEL", clip: "CLIP" }, { aliases: ["LoraLoader", "LoraLoaderModelOnly"] }),
    node("VAEDecode", "VAE Decode", "Latent to pixels.", { vae: link("VAE"), latent: link("LATENT") }, { image: "IMAGE" },
         { aliases: ["VAEDecode"] }),
    node("SaveImage", "Save Image", "Write PNG files.", { images: link("IMAGE") }, {}, { output_node: true, aliases: ["SaveImage"] }),
    node("Show", "Show", "Show any value.", { value: link("*") }, {}),
    node("OldSampler", "Old Sampler", "Denoise a latent, the old way.", { latent: link("LATENT") }, { latent: "LATENT" },
         { deprecated: true }),
  ].map((spec) => [spec.type, spec])),
};

const types = (hits: { spec: NodeTypeSpec }[]) => hits.map((hit) => hit.spec.type);

describe("the node search", () => {
  it("finds nodes by the catalogue's aliases (ComfyUI's names)", () => {
    expect(types(searchNodes(catalogue, "CLIPTextEncode"))[0]).toBe("TextEncode");
    expect(searchNodes(catalogue, "CLIPTextEncode")[0].alias).toBe("CLIPTextEncode");
    expect(types(searchNodes(catalogue, "EmptyLatentImage"))[0]).toBe("EmptyLatent");
    expect(types(searchNodes(catalogue, "LoraLoader"))[0]).toBe("LoadLora");
    expect(types(searchNodes(catalogue, "CheckpointLoaderSimple"))[0]).toBe("LoadCheckpoint");
    expect(types(searchNodes(catalogue, "ksampler"))[0]).toBe("KSampler");
  });

  it("knows no names but the catalogue's", () => {
    expect(searchNodes(catalogue, "PreviewAny")).toEqual([]);
    const named = structuredClone(catalogue);
    named.nodes.Show.aliases = ["PreviewAny"];
    expect(types(searchNodes(named, "PreviewAny"))).toEqual(["Show"]);
    expect(searchNodes(named, "PreviewAny")[0].alias).toBe("PreviewAny");
    // An alias equal to our own name is not shown as another name.
    expect(searchNodes(catalogue, "KSampler")[0].alias).toBeUndefined();
  });

  it("ranks a whole name above its start, a word's start and text inside it, then descriptions", () => {
    // "latent": a word of Empty Latent's name beats "latent" inside K Sampler's description.
    const hits = types(searchNodes(catalogue, "latent"));
    expect(hits.indexOf("EmptyLatent")).toBeLessThan(hits.indexOf("KSampler"));
    expect(hits).toContain("KSampler");  // found by its description
    expect(types(searchNodes(catalogue, "vae decode"))[0]).toBe("VAEDecode");
    expect(types(searchNodes(catalogue, "save"))[0]).toBe("SaveImage");
    // Each word must be found somewhere: "prompt" is in Text Encode's description.
    expect(types(searchNodes(catalogue, "encode prompt"))).toEqual(["TextEncode"]);
    expect(searchNodes(catalogue, "nothing like this")).toEqual([]);
  });

  it("leaves deprecated types out of an empty search and puts them last otherwise", () => {
    expect(types(searchNodes(catalogue, ""))).not.toContain("OldSampler");
    const hits = types(searchNodes(catalogue, "sampler"));
    expect(hits.at(-1)).toBe("OldSampler");
  });

  it("keeps to the nodes a dragged link can join, naming the socket", () => {
    const fromClip = searchNodes(catalogue, "", { from: "output", type: "CLIP" });
    expect(types(fromClip).sort()).toEqual(["LoadLora", "Show", "TextEncode"]);
    expect(fromClip.find((hit) => hit.spec.type === "TextEncode")?.socket).toBe("clip");
    expect(types(fromClip).at(-1)).toBe("Show");  // takes anything: last
    const intoLatent = searchNodes(catalogue, "", { from: "input", type: "LATENT" });
    expect(types(intoLatent).sort()).toEqual(["EmptyLatent", "KSampler"]);
    expect(intoLatent[0].socket).toBe("latent");
    expect(linkSocket(catalogue, catalogue.nodes.KSampler, { from: "output", type: "CONDITIONING" })).toBe("positive");
  });

  it("puts the types the saved workflows use most first among equals", () => {
    const usage = nodeUsage([{ nodes: { a: { type: "SaveImage" }, b: { type: "VAEDecode" } } },
                             { nodes: { c: { type: "SaveImage" } } }, "not a workflow", { nodes: null }]);
    expect(usage).toEqual({ SaveImage: 2, VAEDecode: 1 });
    expect(types(searchNodes(catalogue, "", undefined, usage)).slice(0, 2)).toEqual(["SaveImage", "VAEDecode"]);
    const fromLatent = searchNodes(catalogue, "", { from: "output", type: "LATENT" }, { VAEDecode: 3, KSampler: 1 });
    expect(types(fromLatent)).toEqual(["VAEDecode", "KSampler", "Show"]);
  });
});
