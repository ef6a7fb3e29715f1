// The keyboard shortcuts: what the editor does on each, and what the shortcut sheet lists (one table).

import { canvasActions } from "./canvasActions";
import { actions, getState } from "./store";

export interface Shortcut {
  /** As shown: "Ctrl+Z". */
  keys: string;
  what: string;
  /** The key (event.key, lower case) and whether Ctrl (or Cmd) and Shift are held. */
  key: string;
  mod: boolean;
  shift?: boolean;
  /** Also while typing in a field (Ctrl+S: the browser's own save page is never wanted). */
  inFields?: boolean;
  run: () => void;
}

export const KEYMAP: Shortcut[] = [
  { keys: "Ctrl+Enter", what: "run the graph (the number beside Run: how many times)", key: "enter", mod: true, run: () => void actions.run() },
  { keys: "Ctrl+S", what: "save in the server's workflows folder", key: "s", mod: true, inFields: true,
    run: () => void actions.saveToServer(getState().workflowName) },
  { keys: "Ctrl+Z", what: "undo", key: "z", mod: true, run: actions.undo },
  { keys: "Ctrl+Shift+Z, Ctrl+Y", what: "redo", key: "z", mod: true, shift: true, run: actions.redo },
  { keys: "Ctrl+Y", what: "redo", key: "y", mod: true, run: actions.redo },
  { keys: "Ctrl+A", what: "select everything", key: "a", mod: true, run: actions.selectAll },
  { keys: "Ctrl+C", what: "copy the selected nodes", key: "c", mod: true, run: () => actions.copy() },
  { keys: "Ctrl+V", what: "paste them", key: "v", mod: true, run: () => actions.paste() },
  { keys: "Ctrl+B", what: "bypass the selected nodes (again: run them)", key: "b", mod: true, run: () => actions.toggleMode("bypass") },
  { keys: "Ctrl+M", what: "mute the selected nodes (again: run them)", key: "m", mod: true, run: () => actions.toggleMode("mute") },
  { keys: "Ctrl+G", what: "group the selected nodes", key: "g", mod: true, run: () => void canvasActions.groupSelection() },
  { keys: "?", what: "this sheet", key: "?", mod: false, run: () => actions.toggleShortcuts() },
];

/** Mouse gestures, for the sheet. */
export const GESTURES: [string, string][] = [
  ["double-click the canvas", "search for a node to add there (ComfyUI's names work too)"],
  ["type a letter over the canvas", "the same search, starting with what is typed"],
  ["drag a link into empty space", "search for a node that fits it; it is linked"],
  ["drag from a linked input", "pull its link off, to another input or into empty space"],
  ["double-click a link", "add a reroute point"],
  ["double-click a title", "rename the node or group"],
  ["right-click", "the menu of the canvas, a node, link, group or note"],
  ["Delete / Backspace", "delete the selection"],
  ["drag a group by its title", "move it with what is inside"],
];

/** The shortcut for a key event, if any. */
export function shortcutFor(event: KeyboardEvent, typing: boolean): Shortcut | undefined {
  const mod = event.ctrlKey || event.metaKey;
  const key = event.key.toLowerCase();
  return KEYMAP.find((s) => s.key === key && s.mod === mod && (s.key === "?" || (s.shift ?? false) === event.shiftKey)
                            && (!typing || s.inFields === true));
}
