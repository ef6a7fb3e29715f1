// Editing one literal input of a node, with the widget its schema calls for.

import { type ChangeEvent, type ReactNode, useRef, useState } from "react";

import { type InputSpec, numberProblem, type Widget } from "../catalogue";
import { actions } from "../store";

interface Props {
  nodeId: string;
  name: string;
  spec: InputSpec;
  widget: Widget;
  value: unknown;
  randomize: boolean;
}

export function InputWidget({ nodeId, name, spec, widget, value, randomize }: Props) {
  const testId = `input-${nodeId}-${name}`;
  const set = (next: unknown) => actions.setValue(nodeId, name, next);
  const common = { "data-testid": testId, className: "nodrag nowheel widget", title: spec.description };
  switch (widget.kind) {
    case "none":
      return null;
    case "number":
    case "seed":
      return (
        <NumberField common={common} widget={widget} value={value} onCommit={set}>
          {widget.kind === "seed" && (
            <label className="nodrag randomize" title="Pick a new random seed after each run">
              <input type="checkbox" data-testid={`randomize-${nodeId}-${name}`} checked={randomize}
                     onChange={(event) => actions.setRandomize(nodeId, name, event.target.checked)} />
              random
            </label>
          )}
        </NumberField>
      );
    case "text":
      // Letters typed in one visit to the field are one undo step.
      return widget.multiline
        ? <textarea {...common} rows={3} value={typeof value === "string" ? value : ""}
                    onChange={(event) => set(event.target.value)} onBlur={actions.finishTyping} />
        : <input {...common} type="text" value={typeof value === "string" ? value : ""}
                 onChange={(event) => set(event.target.value)} onBlur={actions.finishTyping} />;
    case "boolean":
      return <input {...common} type="checkbox" checked={value === true} onChange={(event) => set(event.target.checked)} />;
    case "choice":
    case "image": {
      const options = widget.options.includes(String(value ?? "")) || value === undefined
        ? widget.options : [String(value), ...widget.options];
      return (
        <span className="widget-column">
          <select {...common} value={value === undefined ? "" : String(value)} onChange={(event) => set(event.target.value)}>
            {value === undefined && <option value="" disabled>{widget.options.length ? "choose…" : "(none available)"}</option>}
            {options.map((option) => <option key={option} value={option}>{option}</option>)}
          </select>
          {widget.kind === "image" && (
            <>
              <input className="nodrag" type="file" accept="image/png,image/jpeg,image/webp,image/bmp,image/gif"
                     data-testid={`upload-${nodeId}-${name}`}
                     onChange={(event) => {
                       const file = event.target.files?.[0];
                       if (file) void actions.uploadImage(nodeId, name, file);
                     }} />
              {typeof value === "string" && value !== "" && (
                <img className="input-preview" alt={value} src={`/api/files/inputs/${encodeURIComponent(value)}`} />
              )}
            </>
          )}
        </span>
      );
    }
    case "json":
      // Parsed when the field is left, so half-typed JSON is not lost on the way.
      return <input {...common} type="text" key={JSON.stringify(value ?? null)} placeholder="JSON value"
                    defaultValue={value === undefined || value === null ? "" : JSON.stringify(value)}
                    onBlur={(event) => {
                      const text = event.target.value.trim();
                      if (text === "") return set(null);
                      try {
                        set(JSON.parse(text));
                      } catch {
                        set(text);  // not JSON: taken as text, as `nodegraph run --set` does
                      }
                    }} />;
  }
}

interface NumberFieldProps {
  common: { "data-testid": string; className: string; title: string };
  widget: Extract<Widget, { kind: "number" | "seed" }>;
  value: unknown;
  onCommit: (value: number) => void;
  /** Shown beside the field (the seed's "random" box). */
  children?: ReactNode;
}

/** A number typed freely: the text is taken on Enter or when the field is left (the arrows take it at
 *  once), never rewritten; a value the input does not accept is marked with the reason. */
function NumberField({ common, widget, value, onCommit, children }: NumberFieldProps) {
  const [draft, setDraft] = useState<string | null>(null);
  const justFocused = useRef(false);
  const text = draft ?? (typeof value === "number" ? String(value) : "");
  const problem = text.trim() === "" ? null : numberProblem(widget, Number(text));
  const take = (typed: string) => {
    setDraft(null);
    const number = Number(typed);
    // Nothing or half a number (a lone "-") typed: the stored value stays and shows again.
    if (typed.trim() !== "" && Number.isFinite(number) && number !== value) onCommit(number);
  };
  const onChange = (event: ChangeEvent<HTMLInputElement>) => {
    // Typing and pasting are input events with an inputType; a step by the arrows or the arrow keys is not.
    const inputType = (event.nativeEvent as InputEvent).inputType;
    if (inputType) setDraft(event.target.value);
    else take(event.target.value);
  };
  const step = widget.kind === "seed" ? 1 : widget.step;
  const errorId = common["data-testid"].replace(/^input-/, "field-error-");
  return (
    <span className="widget-column">
      <span className="widget-row">
        <input {...common} className={problem ? `${common.className} invalid` : common.className} type="number"
               min={widget.min} max={widget.max} step={step} value={text} onChange={onChange}
               onBlur={(event) => {
                 if (draft !== null) take(event.target.value);
                 actions.finishTyping();
               }}
               // Entering the field selects the number, so what is typed replaces it.
               onFocus={(event) => {
                 event.target.select();
                 justFocused.current = true;
               }}
               onMouseUp={(event) => {
                 if (justFocused.current) event.preventDefault();  // the click would drop the selection
                 justFocused.current = false;
               }}
               onKeyDown={(event) => {
                 if (event.key === "Enter" && draft !== null) take(event.currentTarget.value);
                 else if (event.key === "Escape") setDraft(null);
               }}
               aria-invalid={problem !== null} />
        {children}
      </span>
      {problem && <span className="field-error" data-testid={errorId}>{problem}</span>}
    </span>
  );
}
