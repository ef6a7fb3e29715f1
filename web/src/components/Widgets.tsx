// Editing one literal input of a node, with the widget its schema calls for.

import { type ChangeEvent } from "react";

import { clampNumber, type InputSpec, type Widget } from "../catalogue";
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
    case "seed": {
      const onChange = (event: ChangeEvent<HTMLInputElement>) => {
        if (event.target.value === "" || Number.isNaN(event.target.valueAsNumber)) return;
        set(clampNumber(widget, event.target.valueAsNumber));
      };
      const step = widget.kind === "seed" ? 1 : widget.step;
      return (
        <span className="widget-row">
          <input {...common} type="number" min={widget.min} max={widget.max} step={step}
                 value={typeof value === "number" ? value : ""} onChange={onChange} />
          {widget.kind === "seed" && (
            <label className="nodrag randomize" title="Pick a new random seed after each run">
              <input type="checkbox" data-testid={`randomize-${nodeId}-${name}`} checked={randomize}
                     onChange={(event) => actions.setRandomize(nodeId, name, event.target.checked)} />
              random
            </label>
          )}
        </span>
      );
    }
    case "text":
      return widget.multiline
        ? <textarea {...common} rows={3} value={typeof value === "string" ? value : ""}
                    onChange={(event) => set(event.target.value)} />
        : <input {...common} type="text" value={typeof value === "string" ? value : ""}
                 onChange={(event) => set(event.target.value)} />;
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
