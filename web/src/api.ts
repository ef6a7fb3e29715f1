// The server's HTTP and WebSocket API (docs/api.md), as typed functions. Same origin only.

import type { Catalogue } from "./catalogue";
import type { WorkflowDocument } from "./graph";
import type { ApiRun, ApiRunList, Issue, ServerEvent } from "./runState";

export class ApiError extends Error {
  constructor(public status: number, public code: string, message: string, public issues: Issue[] = []) {
    super(message);
  }
}

async function request<T>(path: string, init?: RequestInit): Promise<T> {
  const response = await fetch(path, init);
  const text = await response.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    throw new ApiError(response.status, "bad_response", `${path}: the server sent something that is not JSON`);
  }
  if (!response.ok) {
    const error = (body ?? {}) as { error?: string; message?: string; issues?: Issue[] };
    const message = error.message ?? (error.issues ? `${error.issues.length} problem(s) in the workflow` : response.statusText);
    throw new ApiError(response.status, error.error ?? "http_error", message, error.issues ?? []);
  }
  return body as T;
}

function jsonBody(method: string, body: unknown): RequestInit {
  return { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

export const api = {
  catalogue: () => request<Catalogue>("/api/nodes"),
  submit: (workflow: WorkflowDocument) => request<{ id: string }>("/api/runs", jsonBody("POST", { workflow })),
  cancel: (id: string) => request<unknown>(`/api/runs/${encodeURIComponent(id)}/cancel`, { method: "POST" }),
  /** Delete a finished run from the server's history (409 run_not_finished for a queued or running one). */
  deleteRun: (id: string) => request<unknown>(`/api/runs/${encodeURIComponent(id)}`, { method: "DELETE" }),
  clearQueue: () => request<unknown>("/api/queue", { method: "DELETE" }),
  pause: () => request<unknown>("/api/queue/pause", { method: "POST" }),
  resume: () => request<unknown>("/api/queue/resume", { method: "POST" }),
  reorder: (order: string[]) => request<unknown>("/api/queue/order", jsonBody("POST", { order })),
  /** The newest `limit` runs and the queue; a run's live node states come from `run`. */
  runs: (limit: number) => request<ApiRunList>(`/api/runs?limit=${limit}`),
  run: (id: string) => request<ApiRun>(`/api/runs/${encodeURIComponent(id)}`),
  workflows: () => request<{ workflows: { name: string }[] }>("/api/workflows"),
  workflow: (name: string) => request<unknown>(`/api/workflows/${encodeURIComponent(name)}`),
  saveWorkflow: (name: string, workflow: WorkflowDocument) =>
    request<unknown>(`/api/workflows/${encodeURIComponent(name)}`, jsonBody("PUT", workflow)),
  convert: (document: unknown) =>
    request<{ workflow: WorkflowDocument; importer: string | null }>("/api/workflows/convert", jsonBody("POST", document)),
  upload: (file: File) => {
    const form = new FormData();
    form.append("file", file, file.name);
    return request<{ name: string; url: string }>("/api/files/inputs", { method: "POST", body: form });
  },
};

/** Follow the event stream, reconnecting after a drop; returns a function that stops it. */
export function followEvents(onEvent: (event: ServerEvent) => void, onConnected: (connected: boolean) => void): () => void {
  let socket: WebSocket | null = null;
  let stopped = false;
  let retry: ReturnType<typeof setTimeout> | undefined;
  const open = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/api/events`);
    socket.onopen = () => onConnected(true);
    socket.onmessage = (message) => onEvent(JSON.parse(message.data as string) as ServerEvent);
    socket.onclose = () => {
      onConnected(false);
      if (!stopped) retry = setTimeout(open, 1000);
    };
  };
  open();
  return () => {
    stopped = true;
    clearTimeout(retry);
    socket?.close();
  };
}
