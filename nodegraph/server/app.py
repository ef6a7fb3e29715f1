"""The HTTP/WebSocket API: routes over the run queue, the node catalogue and the event stream."""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from .. import events as ev
from ..cache import OutputCache
from ..events import Event
from ..executor import Executor
from ..registry import NodeRegistry
from ..validation import WorkflowInvalid
from .queue import FINISHED, RunQueue, RunStore, UnknownRun

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8188
MAX_BODY_BYTES = 32 * 1024 * 1024

QUEUE_KEY = web.AppKey("queue", RunQueue)
SOCKETS_KEY = web.AppKey("sockets", weakref.WeakSet)
REGISTRY_KEY = web.AppKey("registry", NodeRegistry)
BROADCASTER_KEY = web.AppKey("broadcaster", asyncio.Task)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def same_origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse browser requests from other sites: a page elsewhere must not drive a local server."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
        log.warning("refused %s %s from origin %s", request.method, request.path, origin)
        return _error(403, "forbidden_origin", f"requests from origin {origin!r} are not allowed; "
                                               f"only pages served by {request.host} may use this API")
    return await handler(request)


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@web.middleware
async def loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse Host names other than loopback ones: defeats DNS rebinding, where a foreign site's
    own name resolves to 127.0.0.1 and its pages would then pass the same-origin check."""
    hostname = urlsplit(f"//{request.host}").hostname or ""
    if hostname not in LOOPBACK_NAMES:
        log.warning("refused %s %s for host %s", request.method, request.path, request.host)
        return _error(403, "forbidden_host", f"host {request.host!r} is not served; use localhost or 127.0.0.1")
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as error:
        return _error(413, "body_too_large", error.text or "request body too large")


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except json.JSONDecodeError as error:
        raise web.HTTPBadRequest(text=json.dumps({"error": "bad_json", "message": f"request body is not JSON: {error}"}),
                                 content_type="application/json") from None


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in run.items() if key not in ("workflow", "seq")}


async def submit_run(request: web.Request) -> web.Response:
    body = await _read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("workflow"), dict):
        return _error(400, "bad_request", 'expected {"workflow": {...}, "outputs": [node ids] (optional)}')
    outputs = body.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        return _error(400, "bad_request", '"outputs" must be a list of node ids')
    queue = request.app[QUEUE_KEY]
    try:
        run_id = await asyncio.to_thread(queue.submit, body["workflow"], outputs)
    except WorkflowInvalid as invalid:
        return web.json_response({"error": "invalid_workflow", "issues": [i.to_json() for i in invalid.issues]},
                                 status=400)
    return web.json_response({"id": run_id, "status": "queued"}, status=201)


async def list_runs(request: web.Request) -> web.Response:
    status = request.query.get("status")
    runs = request.app[QUEUE_KEY].list(status)
    return web.json_response({"runs": [_run_summary(run) for run in runs], "paused": request.app[QUEUE_KEY].paused})


async def get_run(request: web.Request) -> web.Response:
    try:
        run = request.app[QUEUE_KEY].get(request.match_info["run_id"])
    except UnknownRun as error:
        return _error(404, "unknown_run", str(error))
    run.pop("seq")
    return web.json_response(run)


async def cancel_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    try:
        status = request.app[QUEUE_KEY].cancel(run_id)
    except UnknownRun as error:
        return _error(404, "unknown_run", str(error))
    if status in FINISHED and status != "cancelled":
        return _error(409, "run_finished", f"run {run_id} already ended: {status}", status=status)
    return web.json_response({"id": run_id, "status": status, "cancel_requested": True})


async def clear_queue(request: web.Request) -> web.Response:
    return web.json_response({"cancelled": request.app[QUEUE_KEY].clear()})


async def pause_queue(request: web.Request) -> web.Response:
    request.app[QUEUE_KEY].pause()
    return web.json_response({"paused": True})


async def resume_queue(request: web.Request) -> web.Response:
    request.app[QUEUE_KEY].resume()
    return web.json_response({"paused": False})


async def node_catalogue(request: web.Request) -> web.Response:
    catalogue = request.app[REGISTRY_KEY].catalogue()
    return web.json_response(text=json.dumps(catalogue, default=str))


async def health(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    return web.json_response({"ok": True, "paused": queue.paused, "queued": len(queue.list("queued"))})


async def event_stream(request: web.Request) -> web.WebSocketResponse:
    """Every run event, as JSON text messages, to every connected client; client messages are ignored."""
    socket = web.WebSocketResponse(heartbeat=30)
    await socket.prepare(request)
    sockets = request.app[SOCKETS_KEY]
    sockets.add(socket)
    try:
        async for message in socket:
            if message.type == WSMsgType.ERROR:
                log.warning("event socket closed with %s", socket.exception())
    finally:
        sockets.discard(socket)
    return socket


def _event_message(event: Event) -> str:
    data = event.to_json()
    if event.type == ev.NODE_PREVIEW:
        data.pop("image", None)  # previews are not streamed yet
    return json.dumps(data, default=str)


async def _broadcast(app: web.Application, outbox: asyncio.Queue[str]) -> None:
    """Send queued event messages to every client, one at a time so each client sees them in order."""
    while True:
        text = await outbox.get()
        for socket in list(app[SOCKETS_KEY]):
            if socket.closed:
                continue
            try:
                await socket.send_str(text)
            except ConnectionError:
                log.info("dropped an event for a client that went away")


def create_app(registry: NodeRegistry, db_path: Path | str, output_dir: Path | str = Path("outputs"),
               device: str = "auto", cache: OutputCache | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, loopback_only: bool = True) -> web.Application:
    """The API application; its run queue starts with the app and stops (interrupting a run) with it.

    `loopback_only` accepts only loopback Host names; turn it off only when serving other machines.
    """
    middlewares = [loopback_host_only] if loopback_only else []
    app = web.Application(middlewares=[*middlewares, same_origin_only, json_errors], client_max_size=max_body_bytes)
    app[REGISTRY_KEY] = registry
    app[SOCKETS_KEY] = weakref.WeakSet()

    async def start_queue(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        store = RunStore(db_path)
        queue = RunQueue(Executor(registry, cache, device=device, output_dir=output_dir), store)
        outbox: asyncio.Queue[str] = asyncio.Queue()
        broadcaster = loop.create_task(_broadcast(app, outbox))
        app[BROADCASTER_KEY] = broadcaster

        def hand_off(event: Event) -> None:
            # Called on the worker thread; the sockets and the outbox belong to the loop.
            loop.call_soon_threadsafe(outbox.put_nowait, _event_message(event))

        queue.subscribe(hand_off)
        queue.start()
        app[QUEUE_KEY] = queue

    async def stop_queue(app: web.Application) -> None:
        queue = app[QUEUE_KEY]
        await asyncio.to_thread(queue.stop)
        queue.store.close()
        app[BROADCASTER_KEY].cancel()
        for socket in list(app[SOCKETS_KEY]):
            await socket.close()

    app.on_startup.append(start_queue)
    app.on_cleanup.append(stop_queue)
    app.router.add_post("/api/runs", submit_run)
    app.router.add_get("/api/runs", list_runs)
    app.router.add_get("/api/runs/{run_id}", get_run)
    app.router.add_post("/api/runs/{run_id}/cancel", cancel_run)
    app.router.add_delete("/api/queue", clear_queue)
    app.router.add_post("/api/queue/pause", pause_queue)
    app.router.add_post("/api/queue/resume", resume_queue)
    app.router.add_get("/api/nodes", node_catalogue)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/events", event_stream)
    return app


def serve(registry: NodeRegistry, db_path: Path | str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          **options: Any) -> None:
    """Run the API server until interrupted; a non-loopback `host` lifts the loopback Host check."""
    options.setdefault("loopback_only", host in LOOPBACK_NAMES)
    web.run_app(create_app(registry, db_path, **options), host=host, port=port, print=None)
