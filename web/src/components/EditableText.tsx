// A text shown as it is until double-clicked, then typed over in place: Enter or leaving keeps it, Escape
// does not.

import { useEffect, useState } from "react";

interface Props {
  text: string;
  /** Shown (greyed) when the text is empty. */
  placeholder?: string;
  onCommit: (text: string) => void;
  testId: string;
  className?: string;
  /** Bumped to start typing from outside (the context menu's Rename). */
  editRequest?: number;
}

export function EditableText({ text, placeholder, onCommit, testId, className, editRequest = 0 }: Props) {
  const [draft, setDraft] = useState<string | null>(null);
  useEffect(() => {
    if (editRequest > 0) setDraft(text);
  }, [editRequest]);  // only a new request starts typing (not a change of the text meanwhile)
  if (draft === null) {
    return (
      <span className={className} data-testid={testId} title="double-click to rename"
            onDoubleClick={(event) => { event.stopPropagation(); setDraft(text); }}>
        {text || <span className="muted">{placeholder}</span>}
      </span>
    );
  }
  const finish = (keep: boolean) => {
    if (keep && draft !== text) onCommit(draft);
    setDraft(null);
  };
  return (
    <input className={`nodrag inline-edit ${className ?? ""}`} data-testid={`${testId}-input`} autoFocus value={draft}
           placeholder={placeholder} onChange={(event) => setDraft(event.target.value)}
           onFocus={(event) => event.target.select()} onBlur={() => finish(true)}
           onKeyDown={(event) => {
             event.stopPropagation();
             if (event.key === "Enter") finish(true);
             else if (event.key === "Escape") finish(false);
           }} />
  );
}
