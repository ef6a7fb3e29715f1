// The shortcut help sheet ("?" or the toolbar's "?" button): every key and mouse gesture of the editor.

import { useEffect } from "react";

import { actions, useEditor } from "../store";
import { GESTURES, KEYMAP } from "../keymap";

export function ShortcutSheet() {
  const open = useEditor((s) => s.showShortcuts);
  useEffect(() => {
    if (!open) return;
    const onKey = (event: KeyboardEvent) => {
      if (event.key === "Escape") actions.toggleShortcuts();
    };
    window.addEventListener("keydown", onKey);
    return () => window.removeEventListener("keydown", onKey);
  }, [open]);
  if (!open) return null;
  const keys = KEYMAP.filter((shortcut, i) => KEYMAP.findIndex((s) => s.what === shortcut.what) === i);
  return (
    <div className="dialog-backdrop" onClick={actions.toggleShortcuts}>
      <div className="dialog shortcut-sheet" data-testid="shortcuts" role="dialog" onClick={(event) => event.stopPropagation()}>
        <h2>Keys</h2>
        <table>
          <tbody>
            {keys.map((shortcut) => <tr key={shortcut.keys}><td><kbd>{shortcut.keys}</kbd></td><td>{shortcut.what}</td></tr>)}
          </tbody>
        </table>
        <h2>Mouse</h2>
        <table>
          <tbody>{GESTURES.map(([gesture, what]) => <tr key={gesture}><td>{gesture}</td><td>{what}</td></tr>)}</tbody>
        </table>
        <div className="dialog-buttons"><button onClick={actions.toggleShortcuts}>Close</button></div>
      </div>
    </div>
  );
}
