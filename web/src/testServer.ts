// A stand-in for the server's HTTP API (docs/api.md) and the browser's storage, for the unit tests.

import { vi } from "vitest";

export interface SeenRequest {
  method: string;
  path: string;
  body: unknown;
}

/** What a route answers: a JSON body (status 200), or [status, body]. */
export type Route = (request: SeenRequest) => unknown;

/** Replace `fetch` by routes keyed "METHOD /path" (query string included); returns the requests seen.
 *  A request no route answers is a 404, so a test sees calls it did not expect. */
export function stubServer(routes: Record<string, Route>): SeenRequest[] {
  const seen: SeenRequest[] = [];
  vi.stubGlobal("fetch", async (path: string, init?: RequestInit) => {
    const method = init?.method ?? "GET";
    const body = typeof init?.body === "string" ? JSON.parse(init.body) : init?.body ?? null;
    const request = { method, path, body };
    seen.push(request);
    const route = routes[`${method} ${path}`];
    if (route === undefined) {
      return new Response(JSON.stringify({ error: "not_found", message: `no route ${method} ${path}` }), { status: 404 });
    }
    const answer = route(request);
    const [status, json] = Array.isArray(answer) && answer.length === 2 && typeof answer[0] === "number"
      ? answer as [number, unknown] : [200, answer];
    return new Response(JSON.stringify(json), { status });
  });
  return seen;
}

/** An in-memory localStorage (Node has none). */
export function stubStorage(): Map<string, string> {
  const items = new Map<string, string>();
  vi.stubGlobal("localStorage", {
    getItem: (key: string) => items.get(key) ?? null,
    setItem: (key: string, value: string) => void items.set(key, String(value)),
    removeItem: (key: string) => void items.delete(key),
  });
  return items;
}
