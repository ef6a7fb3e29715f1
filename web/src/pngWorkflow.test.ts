import { describe, expect, it } from "vitest";

import { PngError, pngTextChunk, workflowFromPng } from "./pngWorkflow";

function crc32(bytes: Uint8Array): number {
  let crc = ~0;
  for (const byte of bytes) {
    crc ^= byte;
    for (let bit = 0; bit < 8; bit++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  return ~crc >>> 0;
}

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

function png(...chunks: Uint8Array[]): Uint8Array {
  const parts = [new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", new Uint8Array(13)), ...chunks,
                 chunk("IEND", new Uint8Array())];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

const text = (s: string) => new TextEncoder().encode(s);
const join = (...parts: Uint8Array[]) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
};

describe("PNG workflow chunk", () => {
  const workflow = { version: 1, nodes: { a: { type: "Integer", inputs: { value: 3 } } } };

  it("reads the workflow from a tEXt chunk, skipping other chunks", () => {
    const bytes = png(chunk("tEXt", join(text("parameters"), new Uint8Array([0]), text("x"))),
                      chunk("tEXt", join(text("workflow"), new Uint8Array([0]), text(JSON.stringify(workflow)))));
    expect(workflowFromPng(bytes)).toEqual(workflow);
  });

  it("reads an uncompressed iTXt chunk as UTF-8", () => {
    const body = JSON.stringify({ ...workflow, note: "café ☕" });
    const data = join(text("workflow"), new Uint8Array([0, 0, 0]), text("en"), new Uint8Array([0]), new Uint8Array([0]), text(body));
    expect(pngTextChunk(png(chunk("iTXt", data)), "workflow")).toBe(body);
  });

  it("says why when there is no workflow", () => {
    expect(() => workflowFromPng(png())).toThrow(/no "workflow" text chunk/);
    expect(() => workflowFromPng(text("GIF89a........"))).toThrow(PngError);
    const broken = png(chunk("tEXt", join(text("workflow"), new Uint8Array([0]), text("{nope"))));
    expect(() => workflowFromPng(broken)).toThrow(/not JSON/);
    expect(() => workflowFromPng(png().subarray(0, 20))).toThrow(/truncated/);
  });
});
