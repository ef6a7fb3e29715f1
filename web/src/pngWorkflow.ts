// Reading the workflow that nodegraph's image nodes store in a PNG's "workflow" text chunk.

const PNG_SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

export class PngError extends Error {}

/** The text of the PNG's tEXt or (uncompressed) iTXt chunk with this keyword, or null if it has none. */
export function pngTextChunk(bytes: Uint8Array, keyword: string): string | null {
  if (bytes.length < 8 || PNG_SIGNATURE.some((value, index) => bytes[index] !== value)) {
    throw new PngError("not a PNG file");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  let offset = 8;
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = latin1.decode(bytes.subarray(offset + 4, offset + 8));
    const start = offset + 8;
    const end = start + length;
    if (end > bytes.length) throw new PngError(`PNG chunk ${type} is truncated`);
    const data = bytes.subarray(start, end);
    if (type === "tEXt" || type === "iTXt") {
      const separator = data.indexOf(0);
      if (separator > 0 && latin1.decode(data.subarray(0, separator)) === keyword) {
        if (type === "tEXt") return latin1.decode(data.subarray(separator + 1));
        // iTXt: keyword \0 compression-flag compression-method language \0 translated \0 text
        if (data[separator + 1] !== 0) throw new PngError(`PNG chunk ${keyword} is compressed; not supported`);
        let position = separator + 3;
        for (let zeros = 0; zeros < 2 && position < data.length; position++) if (data[position] === 0) zeros++;
        return utf8.decode(data.subarray(position));
      }
    }
    if (type === "IEND") break;
    offset = end + 4; // skip the CRC
  }
  return null;
}

/** The workflow document stored in a nodegraph PNG; throws PngError if there is none. */
export function workflowFromPng(bytes: Uint8Array): unknown {
  const text = pngTextChunk(bytes, "workflow");
  if (text === null) throw new PngError('this PNG carries no "workflow" text chunk (not made by nodegraph?)');
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new PngError(`the PNG's workflow chunk is not JSON: ${(error as Error).message}`);
  }
}
