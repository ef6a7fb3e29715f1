// A note on the canvas: markdown, typed over after a double-click (a new, empty note opens for typing);
// resized from its edges when selected.

import { type Node, type NodeProps, NodeResizer } from "@xyflow/react";
import { useState } from "react";

import { canvasActions } from "../canvasActions";
import { Markdown } from "../markdown";
import type { Note } from "../uiElements";

export type NoteData = { note: Note };

export function NoteNode({ data, selected }: NodeProps<Node<NoteData, "note">>) {
  const { note } = data;
  const [draft, setDraft] = useState<string | null>(note.text === "" ? "" : null);
  const style = note.color ? { borderColor: note.color, background: `${note.color}40` } : undefined;
  return (
    <>
      <NodeResizer isVisible={selected} minWidth={120} minHeight={60} />
      <div className="note" data-testid={`note-${note.id}`} style={style}>
        {draft === null
          ? <div className="note-text" onDoubleClick={() => setDraft(note.text)} title="double-click to edit (markdown)">
              <Markdown text={note.text} />
            </div>
          : <textarea className="nodrag nowheel note-edit" data-testid={`note-edit-${note.id}`} autoFocus value={draft}
                      placeholder="a note (markdown: # heading, **bold**, - list)"
                      onChange={(event) => setDraft(event.target.value)}
                      onKeyDown={(event) => {
                        event.stopPropagation();
                        if (event.key === "Escape") setDraft(null);
                      }}
                      onBlur={() => {
                        if (draft !== note.text) canvasActions.updateNote(note.id, { text: draft });
                        setDraft(null);
                      }} />}
      </div>
    </>
  );
}
