import { describe, expect, it } from "vitest";

import { KEYMAP, shortcutFor } from "./keymap";

const key = (k: string, mods: { ctrl?: boolean; shift?: boolean; meta?: boolean } = {}) =>
  ({ key: k, ctrlKey: mods.ctrl ?? false, shiftKey: mods.shift ?? false, metaKey: mods.meta ?? false }) as KeyboardEvent;

describe("the keymap", () => {
  it("finds the shortcut for a key, Ctrl or Cmd alike, Shift telling undo from redo", () => {
    expect(shortcutFor(key("z", { ctrl: true }), false)?.what).toBe("undo");
    expect(shortcutFor(key("Z", { ctrl: true, shift: true }), false)?.what).toBe("redo");
    expect(shortcutFor(key("b", { meta: true }), false)?.keys).toBe("Ctrl+B");
    expect(shortcutFor(key("?", { shift: true }), false)?.what).toBe("this sheet");
    expect(shortcutFor(key("b"), false)).toBeUndefined();
  });

  it("leaves keys typed into a field to the field, except Ctrl+S", () => {
    expect(shortcutFor(key("z", { ctrl: true }), true)).toBeUndefined();
    expect(shortcutFor(key("a", { ctrl: true }), true)).toBeUndefined();
    expect(shortcutFor(key("s", { ctrl: true }), true)?.keys).toBe("Ctrl+S");
  });

  it("names every key it handles once", () => {
    const handled = KEYMAP.map((s) => `${s.mod}${s.shift ?? false}${s.key}`);
    expect(new Set(handled).size).toBe(handled.length);
  });
});
