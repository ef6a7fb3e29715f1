// The side panels: the node palette (from the catalogue) and the run queue.

import { useState } from "react";

import { api } from "../api";
import { paletteGroups } from "../catalogue";
import { runProgress } from "../runState";
import { actions, useEditor } from "../store";

export const PALETTE_DRAG_TYPE = "application/x-nodegraph-type";

export function Palette({ onAdd }: { onAdd: (type: string) => void }) {
  const catalogue = useEditor((s) => s.catalogue);
  const [search, setSearch] = useState("");
  const [closed, setClosed] = useState<Set<string>>(new Set());
  if (catalogue === null) return <aside className="palette">loading nodes…</aside>;
  const groups = paletteGroups(catalogue, search);
  const toggle = (category: string) => {
    const next = new Set(closed);
    if (next.has(category)) next.delete(category);
    else next.add(category);
    setClosed(next);
  };
  return (
    <aside className="palette" data-testid="palette">
      <input className="palette-search" type="search" placeholder="search nodes" value={search}
             data-testid="palette-search" onChange={(event) => setSearch(event.target.value)} />
      {groups.map(([category, specs]) => (
        <section key={category}>
          <h3 onClick={() => toggle(category)}>{closed.has(category) && !search ? "▸" : "▾"} {category}</h3>
          {(!closed.has(category) || search) && specs.map((spec) => (
            <div key={spec.type} className="palette-item" title={spec.description} draggable
                 data-testid={`palette-${spec.type}`}
                 onDragStart={(event) => event.dataTransfer.setData(PALETTE_DRAG_TYPE, spec.type)}
                 onClick={() => onAdd(spec.type)}>
              {spec.display_name}
            </div>
          ))}
        </section>
      ))}
      {groups.length === 0 && <p className="muted">no node matches “{search}”</p>}
    </aside>
  );
}

export function QueuePanel() {
  const runs = useEditor((s) => s.runs);
  const connected = useEditor((s) => s.connected);
  const recent = [...runs.order].reverse().slice(0, 20);
  const call = (promise: Promise<unknown>) => promise.catch((error: Error) => actions.notify(error.message, true));
  return (
    <aside className="queue" data-testid="queue">
      <div className="queue-head">
        <strong>Queue</strong>
        <span className={connected ? "ok" : "bad"} title="event stream">{connected ? "● live" : "○ offline"}</span>
      </div>
      <div className="queue-buttons">
        {runs.queue.paused
          ? <button onClick={() => call(api.resume())}>Resume</button>
          : <button onClick={() => call(api.pause())}>Pause</button>}
        <button onClick={() => call(api.clearQueue())} disabled={runs.queue.queued.length === 0}>Clear</button>
      </div>
      {recent.length === 0 && <p className="muted">no runs yet</p>}
      {recent.map((id) => {
        const run = runs.runs[id];
        const position = runs.queue.queued.indexOf(id);
        return (
          <div key={id} className={`run run-${run.status}`} data-testid={`run-${id}`} data-status={run.status}>
            <div className="run-line">
              <span className="run-id">{id.slice(0, 8)}</span>
              <span>{run.status}{position >= 0 ? ` #${position + 1}` : ""}</span>
              {run.currentNode && <span className="muted">{run.currentNode}</span>}
              {position > 0 && (
                <button title="run next" onClick={() => call(api.reorder([id]))}>↑</button>
              )}
              {(run.status === "queued" || run.status === "running") && (
                <button title="cancel" onClick={() => call(api.cancel(id))}>✕</button>
              )}
            </div>
            <div className="run-progress"><div style={{ width: `${Math.round(100 * runProgress(run))}%` }} /></div>
            {run.error && <div className="node-issue">{run.error}</div>}
            {run.images.length > 0 && (
              <div className="run-images">
                {run.images.map((src, index) => (
                  <img key={src} src={src} alt="" className="clickable" data-testid={`run-image-${id}-${index}`}
                       onClick={() => actions.openViewer(run.images, index, id)} />
                ))}
              </div>
            )}
          </div>
        );
      })}
    </aside>
  );
}
