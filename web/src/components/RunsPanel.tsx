// The right-hand panel: the queue (running and waiting runs: progress, cancel, run next; pause, clear)
// and the history of finished runs read from the server (so it survives reloads): thumbnails, prompt,
// time, the run's workflow reopened in one click (in a new tab), deletion from the server's history.

import { useEffect } from "react";

import { api } from "../api";
import { runTime } from "../runHistory";
import { runProgress, type RunView } from "../runState";
import { actions, useEditor } from "../store";

const HISTORY_SHOWN = 50;
const THUMBNAILS = 4;

const call = (promise: Promise<unknown>) => promise.catch((error: Error) => actions.notify(error.message, true));

function Prompt({ id }: { id: string }) {
  const info = useEditor((s) => s.runInfo[id]);
  if (info === undefined) return <div className="run-prompt muted">…</div>;
  return <div className="run-prompt" data-testid={`run-prompt-${id}`} title={info.prompt ?? ""}>{info.prompt ?? <i className="muted">no prompt</i>}</div>;
}

function Thumbnails({ run }: { run: RunView }) {
  if (run.images.length === 0) return null;
  return (
    <div className="run-images">
      {run.images.slice(0, THUMBNAILS).map((src, index) => (
        <img key={src} src={src} alt="" className="clickable" data-testid={`run-image-${run.id}-${index}`} loading="lazy"
             onClick={() => actions.openViewer(run.images, index, run.id)} />
      ))}
      {run.images.length > THUMBNAILS && <span className="muted">+{run.images.length - THUMBNAILS}</span>}
    </div>
  );
}

function QueueEntry({ run, position }: { run: RunView; position: number }) {
  return (
    <div className={`run run-${run.status}`} data-testid={`run-${run.id}`} data-status={run.status}>
      <div className="run-line">
        <span className="run-id">{run.id.slice(0, 8)}</span>
        <span>{run.status}{position >= 0 ? ` #${position + 1}` : ""}</span>
        {run.currentNode && <span className="muted">{run.currentNode}</span>}
        {position > 0 && <button title="run next" onClick={() => call(api.reorder([run.id]))}>↑</button>}
        <button title="cancel" onClick={() => call(api.cancel(run.id))}>✕</button>
      </div>
      <div className="run-progress"><div style={{ width: `${Math.round(100 * runProgress(run))}%` }} /></div>
      <Prompt id={run.id} />
      <Thumbnails run={run} />
    </div>
  );
}

function HistoryEntry({ run }: { run: RunView }) {
  const time = run.finished ?? run.created;
  return (
    <div className={`run run-${run.status}`} data-testid={`run-${run.id}`} data-status={run.status}>
      <div className="run-line">
        <span className="run-time" title={run.id}>{time !== undefined ? runTime(time) : run.id.slice(0, 8)}</span>
        <span className={`run-status ${run.status}`}>{run.status}</span>
        {run.seconds !== undefined && <span className="muted">{run.seconds.toFixed(1)} s</span>}
        <button title="open the workflow this run ran, in a new tab" data-testid={`history-open-${run.id}`}
                onClick={() => void actions.openRunWorkflow(run.id)}>Open</button>
        <button title="delete this run from the history (the files it wrote stay)" data-testid={`history-delete-${run.id}`}
                onClick={() => void actions.deleteRun(run.id)}>✕</button>
      </div>
      <Thumbnails run={run} />
      <Prompt id={run.id} />
      {run.error && <div className="node-issue">{run.error}</div>}
    </div>
  );
}

export function RunsPanel() {
  const runs = useEditor((s) => s.runs);
  const connected = useEditor((s) => s.connected);
  const newestFirst = [...runs.order].reverse().map((id) => runs.runs[id]);
  const waiting = newestFirst.filter((run) => run.status === "queued" || run.status === "running").reverse();
  const finished = newestFirst.filter((run) => run.status !== "queued" && run.status !== "running")
    .slice(0, HISTORY_SHOWN);
  const listed = [...waiting, ...finished].map((run) => run.id).join(" ");
  useEffect(() => {
    if (listed !== "") void actions.loadRunInfo(listed.split(" "));
  }, [listed]);
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
      {waiting.length === 0 && <p className="muted">nothing queued</p>}
      {waiting.map((run) => <QueueEntry key={run.id} run={run} position={runs.queue.queued.indexOf(run.id)} />)}
      <div className="queue-head history-head">
        <strong>History</strong>
        <span className="muted" data-testid="history-count">{finished.length}</span>
      </div>
      {finished.length === 0 && <p className="muted">no finished runs</p>}
      <div data-testid="history">
        {finished.map((run) => <HistoryEntry key={run.id} run={run} />)}
      </div>
    </aside>
  );
}
