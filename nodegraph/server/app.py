"""The HTTP/WebSocket API: routes over the run queue, the node catalogue, files and the event stream."""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from ..cache import OutputCache
from ..event_json import event_json
from ..events import NODE_PREVIEW, Event
from ..executor import Executor
from ..files import atomic_write
from ..importers import is_native
from ..json_values import JsonRefused, decode_json, json_problems
from ..registry import NodeRegistry
from ..validation import WorkflowInvalid
from .access import (LOOPBACK_NAMES, Handler, error_response, host_required, loopback_host_only, same_origin_only,
                     token_required)
from .event_stream import EventHub, StreamLimits
from .folders import (IMAGE_SUFFIXES, MAX_NAME_LENGTH, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, NotAFile, PathRefused,
                      ServedFolder, UploadRefused, check_image, safe_file_name, store_upload)
from .openapi import openapi_document
from .queue import (FINISHED, QUEUE_CHANGED, QUEUE_EVENT_IDS, WORKER_FIELDS, NotQueued, RunBackend, RunNotFinished,
                    RunQueue, RunStore, UnknownRun)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8188
MAX_BODY_BYTES = 32 * 1024 * 1024
PACKAGED_EDITOR_DIR = Path(__file__).resolve().parent / "editor"
"""The built editor inside an installed wheel (setup.py copies web/dist there when it builds one)."""
CHECKOUT_EDITOR_DIR = Path(__file__).resolve().parents[2] / "web" / "dist"
"""Where `npm run build` in web/ puts the editor in a source checkout (an editable install)."""
EDITOR_DIR = PACKAGED_EDITOR_DIR if (PACKAGED_EDITOR_DIR / "index.html").is_file() else CHECKOUT_EDITOR_DIR
"""The editor `nodegraph serve` serves by default: the installed one, else the checkout's build."""

# File types a browser could run as a page of this origin are sent as downloads, never shown.
_ACTIVE_CONTENT = frozenset({"text/html", "image/svg+xml", "application/xhtml+xml", "text/xml", "application/xml",
                             "text/javascript", "application/javascript"})
_EDITOR_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

QUEUE_KEY = web.AppKey("queue", RunQueue)
EVENTS_KEY = web.AppKey("events", EventHub)
REGISTRY_KEY = web.AppKey("registry", NodeRegistry)
FOLDERS_KEY = web.AppKey("folders", dict)
LIMITS_KEY = web.AppKey("limits", dict)


class BadRequest(Exception):
    """A request the client must change: turned into a 400 response with this message."""

    code = "bad_request"


class BadJson(BadRequest):
    """A request body that is not acceptable JSON (JsonRefused says why)."""

    code = "bad_json"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as the API's JSON error body, aiohttp's own 4xx included; an unexpected fault
    is logged with its traceback and answered as a JSON 500, never as a plain-text page."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as error:
        return error_response(413, "body_too_large", error.text or "request body too large")
    except BadRequest as error:
        return error_response(400, error.code, str(error))
    except web.HTTPException as error:
        if error.status < 400 or error.content_type == "application/json":
            raise
        code = error.reason.lower().replace(" ", "_").replace("-", "_")
        return error_response(error.status, code, error.text if error.text and error.text != f"{error.status}: "
                              f"{error.reason}" else error.reason, **({"allow": error.headers["Allow"]}
                                                                    if "Allow" in error.headers else {}))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # a fault of ours: the client gets a JSON error, the log gets the traceback
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "the server failed on this request; its log has the details")


@web.middleware
async def no_sniffing(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
    return response


_DECODE_ON_LOOP_BYTES = 256 * 1024
"""Larger bodies are decoded on a thread, so one big request does not hold up the others."""


async def _read_json(request: web.Request) -> Any:
    body = await request.read()
    try:
        if len(body) > _DECODE_ON_LOOP_BYTES:
            return await asyncio.to_thread(decode_json, body, "request body")
        return decode_json(body, "request body")
    except JsonRefused as error:
        raise BadJson(str(error)) from None


def _refuse_non_json(document: Any, what: str) -> None:
    """400 for values a JSON client could not read back (NaN, lone surrogates, too deep)."""
    problems = json_problems(document)
    if problems:
        raise BadJson(f"{what}: " + "; ".join(f"{p.where}: {p.message}" for p in problems[:5]))


# -- runs and the queue --

def _add_file_urls(outputs: ServedFolder, data: dict[str, Any]) -> dict[str, Any]:
    """Beside each `files` list (of the run, and of each node), `file_urls`: their download
    addresses, None for a file outside the output folder."""
    holders = [data, *(data["nodes"].values() if isinstance(data.get("nodes"), dict) else ())]
    for holder in holders:
        if isinstance(holder.get("files"), list):
            relatives = [outputs.relative(path) for path in holder["files"]]
            holder["file_urls"] = [None if rel is None else f"/api/files/outputs/{quote(rel)}" for rel in relatives]
    return data


def _with_file_urls(request: web.Request, data: dict[str, Any]) -> dict[str, Any]:
    return _add_file_urls(request.app[FOLDERS_KEY]["outputs"], data)


async def submit_run(request: web.Request) -> web.Response:
    body = await _read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("workflow"), dict):
        raise BadRequest('expected {"workflow": {...}, "outputs": [node ids] (optional)}')
    outputs = body.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise BadRequest('"outputs" must be a list of node ids')
    queue = request.app[QUEUE_KEY]
    try:
        run_id = await asyncio.to_thread(queue.submit, body["workflow"], outputs)
    except WorkflowInvalid as invalid:
        return web.json_response({"error": "invalid_workflow", "message": str(invalid),
                                  "issues": [i.to_json() for i in invalid.issues]}, status=400)
    return web.json_response({"id": run_id, "status": "queued"}, status=201)


def run_prompt(workflow: Any, registry: NodeRegistry) -> str | None:
    """What a list of runs shows as a run's prompt: the first non-empty text of a multi-line text input
    (the catalogue's `multiline`) that its workflow sets or leaves at its default, in node order (a
    prompt comes before its negative, which is usually empty), linked inputs skipped. None if there
    is none."""
    nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
    if not isinstance(nodes, dict):
        return None
    for node in nodes.values():
        is_node = isinstance(node, dict) and isinstance(node.get("type"), str)
        node_class = registry.get(node["type"]) if is_node else None
        if node_class is None:
            continue  # not a node (the run was validated), or its pack is no longer loaded
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        for name, spec in node_class.specs().inputs.items():
            value = inputs.get(name, spec.default)
            if spec.extra.get("multiline") is True and isinstance(value, str) and value.strip():
                return value
    return None


def _run_record(request: web.Request, run: dict[str, Any], with_workflow: bool) -> dict[str, Any]:
    """A run as the API shows it: with its file URLs and its `prompt`, with or without its workflow."""
    record = run if with_workflow else {k: v for k, v in run.items() if k != "workflow"}
    record["prompt"] = run_prompt(run.get("workflow"), request.app[REGISTRY_KEY])
    return _with_file_urls(request, record)


async def list_runs(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    status = request.query.get("status")
    limit_text = request.query.get("limit")
    if limit_text is not None and not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 9):
        raise BadRequest(f"limit must be a whole number (0 to 999999999), got {limit_text[:40]!r}")

    def summaries() -> list[dict[str, Any]]:
        runs = queue.list(status)
        if limit_text is not None:
            runs = runs[-int(limit_text):] if int(limit_text) else []
        return [_run_record(request, run, with_workflow=False) for run in runs]

    runs = await asyncio.to_thread(summaries)
    return web.json_response({"runs": runs, **queue.snapshot()})


async def get_run(request: web.Request) -> web.Response:
    try:
        run = request.app[QUEUE_KEY].get(request.match_info["run_id"])
    except UnknownRun as error:
        return error_response(404, "unknown_run", str(error))
    return web.json_response(_run_record(request, run, with_workflow=True))


async def cancel_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    try:
        status = request.app[QUEUE_KEY].cancel(run_id)
    except UnknownRun as error:
        return error_response(404, "unknown_run", str(error))
    if status in FINISHED and status != "cancelled":
        return error_response(409, "run_finished", f"run {run_id} already ended: {status}", status=status)
    return web.json_response({"id": run_id, "status": status, "cancel_requested": True})


async def delete_run(request: web.Request) -> web.Response:
    """Delete a finished run from the history; the files it wrote stay in the output folder."""
    run_id = request.match_info["run_id"]
    try:
        await asyncio.to_thread(request.app[QUEUE_KEY].delete, run_id)
    except UnknownRun as error:
        return error_response(404, "unknown_run", str(error))
    except RunNotFinished as error:
        return error_response(409, "run_not_finished", str(error), status=error.status)
    return web.json_response({"id": run_id, "deleted": True})


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(request.app[QUEUE_KEY].snapshot())


async def reorder_queue(request: web.Request) -> web.Response:
    body = await _read_json(request)
    order = body.get("order") if isinstance(body, dict) else None
    if not (isinstance(order, list) and all(isinstance(run_id, str) for run_id in order)):
        raise BadRequest('expected {"order": [run ids, first to run first]}')
    try:
        new_order = request.app[QUEUE_KEY].reorder(order)
    except NotQueued as error:
        return error_response(409, "not_queued", str(error), run_ids=error.run_ids)
    return web.json_response({"queued": new_order})


async def clear_queue(request: web.Request) -> web.Response:
    return web.json_response({"cancelled": request.app[QUEUE_KEY].clear()})


async def pause_queue(request: web.Request) -> web.Response:
    request.app[QUEUE_KEY].pause()
    return web.json_response({"paused": True})


async def resume_queue(request: web.Request) -> web.Response:
    request.app[QUEUE_KEY].resume()
    return web.json_response({"paused": False})


# -- the catalogue --

async def node_catalogue(request: web.Request) -> web.Response:
    # Choices can list folders (models, inputs): build off the loop.
    catalogue = await asyncio.to_thread(request.app[REGISTRY_KEY].catalogue)
    return web.json_response(text=json.dumps(catalogue, default=str))


async def model_lists(request: web.Request) -> web.Response:
    """The files each model folder offers, gathered from the inputs that pick from a folder."""
    catalogue = await asyncio.to_thread(request.app[REGISTRY_KEY].catalogue)
    folders: dict[str, list[Any]] = {}
    for node in catalogue["nodes"].values():
        for spec in node["inputs"].values():
            if spec.get("choices_kind"):
                folders[spec["choices_kind"]] = spec.get("choices", [])
    return web.json_response({"folders": folders})


async def health(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    return web.json_response({"ok": True, "paused": queue.paused, "queued": len(queue.store.queued_ids())})


async def list_workers(request: web.Request) -> web.Response:
    workers = request.app[QUEUE_KEY].backend.workers()
    return web.json_response({"workers": [{field: worker[field] for field in WORKER_FIELDS} for worker in workers]})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# -- files --

def _folder(request: web.Request) -> ServedFolder:
    folder = request.app[FOLDERS_KEY].get(request.match_info["folder"])
    if folder is None or folder.name == "workflows":
        raise web.HTTPNotFound(text=json.dumps({"error": "unknown_folder", "message":
                               f"no folder {request.match_info['folder']!r}; expected inputs or outputs"}),
                               content_type="application/json")
    return folder


async def list_files(request: web.Request) -> web.Response:
    folder = _folder(request)
    suffixes = IMAGE_SUFFIXES if request.query.get("images") == "1" else None
    files = await asyncio.to_thread(folder.list, suffixes)
    for item in files:
        item["url"] = f"/api/files/{folder.name}/{quote(str(item['name']))}"
    return web.json_response({"folder": folder.name, "files": files})


async def download_file(request: web.Request) -> web.StreamResponse:
    folder = _folder(request)
    relative = request.match_info["path"]
    try:
        path = folder.resolve(relative)
    except PathRefused as error:
        log.warning("refused file request: %s", error)
        return error_response(403, "path_refused", str(error))
    except NotAFile as error:
        return error_response(404, "no_such_file", str(error))
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"Cache-Control": "no-cache"}
    if content_type in _ACTIVE_CONTENT:
        content_type = "application/octet-stream"
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(path.name)}"
    headers["Content-Type"] = content_type
    return web.FileResponse(path, headers=headers)


async def upload_input(request: web.Request) -> web.Response:
    """Multipart upload of one image (field `file`) into the inputs folder."""
    limits = request.app[LIMITS_KEY]
    max_bytes = limits["upload_bytes"]
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        return error_response(413, "upload_too_large", f"upload is {request.content_length} bytes; "
                              f"at most {max_bytes} bytes are accepted")
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("expected a multipart/form-data body with the image in a field named 'file'")
    try:
        found = await _multipart_file(request, max_bytes)
    except (ValueError, AssertionError, KeyError, HttpProcessingError) as error:  # aiohttp's multipart reader on a bad body
        raise BadRequest(f"the multipart body cannot be read ({type(error).__name__}: {str(error)[:200]}); expected "
                         "multipart/form-data with a boundary and the image in a field named 'file'") from None
    if found is None:
        raise BadRequest("the multipart body has no field named 'file'")
    if isinstance(found, web.Response):
        return found
    filename, data = found
    try:
        image_format, width, height = await asyncio.to_thread(check_image, data, limits["upload_pixels"])
    except UploadRefused as error:
        return error_response(415, "unsupported_image", str(error))
    inputs = request.app[FOLDERS_KEY]["inputs"]
    # Some clients percent-encode the name in Content-Disposition; it is only a hint anyway.
    client_name = unquote(filename or "upload")
    name = await asyncio.to_thread(store_upload, inputs, client_name, data, image_format)
    log.info("stored upload %s (%s, %dx%d)", name, image_format, width, height)
    return web.json_response({"name": name, "folder": "inputs", "format": image_format, "width": width,
                              "height": height, "url": f"/api/files/inputs/{quote(name)}"}, status=201)


async def _multipart_file(request: web.Request, max_bytes: int) -> tuple[str | None, bytes] | web.Response | None:
    """The file name and bytes of the multipart field `file`; a 413 response when it is too big;
    None when there is no such field."""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if getattr(part, "name", None) != "file":
            continue
        chunks, size = [], 0
        while chunk := await part.read_chunk():
            size += len(chunk)
            if size > max_bytes:
                return error_response(413, "upload_too_large", f"upload is over {max_bytes} bytes")
            chunks.append(chunk)
        return part.filename, b"".join(chunks)
    return None


# -- saved workflows --

def _workflow_name(request: web.Request) -> str:
    name = request.match_info["name"]
    cleaned = safe_file_name(name, default_stem="")
    if cleaned != name or not name.endswith(".json"):
        raise BadRequest(f"workflow name {name[:100]!r} must be a plain file name ending in .json "
                         f"(letters, digits, '.', '_', '-'; at most {MAX_NAME_LENGTH} characters)")
    return name


async def list_workflows(request: web.Request) -> web.Response:
    folder: ServedFolder = request.app[FOLDERS_KEY]["workflows"]
    files = await asyncio.to_thread(folder.list, frozenset({".json"}))
    return web.json_response({"workflows": [item for item in files if "/" not in str(item["name"])]})


async def get_workflow(request: web.Request) -> web.Response:
    folder: ServedFolder = request.app[FOLDERS_KEY]["workflows"]
    try:
        path = folder.resolve(_workflow_name(request))
    except PathRefused as error:
        return error_response(403, "path_refused", str(error))
    except NotAFile as error:
        return error_response(404, "no_such_workflow", str(error))
    try:
        document = await asyncio.to_thread(decode_json, path.read_bytes(), f"workflows/{path.name}")
    except JsonRefused as error:
        return error_response(422, "bad_workflow_file", str(error))
    problems = json_problems(document)
    if problems:
        return error_response(422, "bad_workflow_file", f"workflows/{path.name}: {problems[0].where}: "
                              f"{problems[0].message}")
    return web.json_response(document)


async def save_workflow(request: web.Request) -> web.Response:
    folder: ServedFolder = request.app[FOLDERS_KEY]["workflows"]
    name = _workflow_name(request)
    document = await _read_json(request)
    if not isinstance(document, dict) or not isinstance(document.get("nodes"), dict):
        raise BadRequest('expected a workflow document: {"version": 1, "nodes": {...}}')
    _refuse_non_json(document, "the workflow document")
    await asyncio.to_thread(atomic_write, folder.root / name, json.dumps(document, indent=2).encode() + b"\n")
    return web.json_response({"name": name}, status=201)


async def convert_workflow(request: web.Request) -> web.Response:
    """A document of another tool (ComfyUI's, say) converted by a pack's importer; ours unchanged."""
    document = await _read_json(request)
    _refuse_non_json(document, "the document")
    try:
        converted, importer = await asyncio.to_thread(request.app[REGISTRY_KEY].import_document, document)
    except WorkflowInvalid as invalid:  # WorkflowImportError: every node and input it cannot map
        return web.json_response({"error": "cannot_import", "message": str(invalid),
                                  "issues": [i.to_json() for i in invalid.issues]}, status=400)
    if importer is None and not is_native(converted):
        known = ", ".join(i.name for i in request.app[REGISTRY_KEY].importers) or "none loaded"
        return error_response(422, "unknown_format", "not a nodegraph workflow, and no importer recognises it "
                              f"(importers: {known})")
    return web.json_response({"workflow": converted, "importer": importer})


# -- the event stream --

async def event_stream(request: web.Request) -> web.WebSocketResponse:
    """Every run and queue event, as JSON text messages, to every client; client messages are ignored.

    The first message is the queue's current state, so a client needs no separate request. Each
    client has its own outbox and sender (see event_stream.py): one that stops reading loses
    previews, then its connection, and holds up no other.
    """
    socket = web.WebSocketResponse(heartbeat=30)
    await socket.prepare(request)
    queue = request.app[QUEUE_KEY]
    first = json.dumps({"type": QUEUE_CHANGED, "run_id": "", "node_id": None, **queue.snapshot(QUEUE_EVENT_IDS)})
    hub = request.app[EVENTS_KEY]
    client = hub.connect(socket, request, first)
    try:
        async for message in socket:
            if message.type == WSMsgType.ERROR:
                log.warning("event socket closed with %s", socket.exception())
    finally:
        hub.disconnect(client)
    return socket


# -- the editor --

def _editor_routes(app: web.Application, editor_dir: Path) -> None:
    index = editor_dir / "index.html"

    async def editor_page(request: web.Request) -> web.StreamResponse:
        if not index.is_file():
            return web.Response(status=404, content_type="text/plain",
                                text=f"The editor is not built ({index} is missing). Build it with "
                                     "`make setup`, or `npm ci && npm run build` in web/.")
        return web.FileResponse(index, headers={"Content-Security-Policy": _EDITOR_CSP, "Cache-Control": "no-cache"})

    async def favicon(request: web.Request) -> web.StreamResponse:
        icon = editor_dir / "favicon.ico"  # from web/public, copied into the build by Vite
        if not icon.is_file():
            return web.Response(status=404, content_type="text/plain", text=f"{icon} is missing")
        return web.FileResponse(icon, headers={"Content-Type": "image/x-icon"})

    app.router.add_get("/", editor_page)
    app.router.add_get("/favicon.ico", favicon)
    if (editor_dir / "assets").is_dir():
        app.router.add_static("/assets", editor_dir / "assets")


def create_app(registry: NodeRegistry, db_path: Path | str, output_dir: Path | str = Path("outputs"),
               device: str = "auto", cache: OutputCache | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, loopback_only: bool = True, token: str | None = None,
               inputs_dir: Path | str = Path("inputs"), workflows_dir: Path | str = Path("workflows"),
               editor_dir: Path | str = EDITOR_DIR, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_upload_pixels: int = MAX_UPLOAD_PIXELS, backend: RunBackend | None = None,
               event_limits: StreamLimits | None = None, memory_budget: int | None = None) -> web.Application:
    """The API application; its run queue starts with the app and stops (interrupting a run) with it.

    Runs execute in this process, one at a time, unless a `backend` places them elsewhere (see
    nodegraph.server.ray_backend); the queue starts and stops it.

    `loopback_only` accepts only loopback Host names; turn it off only when serving other machines,
    and then give a `token` that every request must carry. `event_limits` bounds what waits for
    each event client; `memory_budget` overrides the device memory that workflows are checked against.
    """
    middlewares: list[Any] = [json_errors, no_sniffing, host_required]
    if loopback_only:
        middlewares.append(loopback_host_only)
    middlewares.append(same_origin_only)
    if token is not None:
        middlewares.append(token_required(token))
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[REGISTRY_KEY] = registry
    hub = app[EVENTS_KEY] = EventHub(event_limits)
    app[FOLDERS_KEY] = {"inputs": ServedFolder("inputs", Path(inputs_dir)),
                        "outputs": ServedFolder("outputs", Path(output_dir)),
                        "workflows": ServedFolder("workflows", Path(workflows_dir))}
    app[LIMITS_KEY] = {"upload_bytes": max_upload_bytes, "upload_pixels": max_upload_pixels}
    outputs_folder = app[FOLDERS_KEY]["outputs"]

    def message(event: Event) -> str:
        return json.dumps(_add_file_urls(outputs_folder, event_json(event)), default=str)

    async def start_queue(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        store = RunStore(db_path)
        budget: dict[str, Any] = {} if memory_budget is None else {"memory_budget": memory_budget}
        queue = RunQueue(Executor(registry, cache, device=device, output_dir=output_dir, **budget), store, backend)

        def hand_off(event: Event) -> None:
            # Called on the worker thread (or a request's): encoded here, once for every client;
            # the clients and their outboxes belong to the loop.
            loop.call_soon_threadsafe(hub.publish, message(event), event.type == NODE_PREVIEW)

        queue.subscribe(hand_off)
        queue.start()
        app[QUEUE_KEY] = queue

    async def close_sockets(app: web.Application) -> None:
        # Before the server waits for open requests to end: an event stream never ends by itself.
        await hub.close_all()

    async def stop_queue(app: web.Application) -> None:
        queue = app[QUEUE_KEY]
        await asyncio.to_thread(queue.stop)
        queue.store.close()

    app.on_startup.append(start_queue)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop_queue)
    app.router.add_post("/api/runs", submit_run)
    app.router.add_get("/api/runs", list_runs)
    app.router.add_get("/api/runs/{run_id}", get_run)
    app.router.add_delete("/api/runs/{run_id}", delete_run)
    app.router.add_post("/api/runs/{run_id}/cancel", cancel_run)
    app.router.add_get("/api/queue", get_queue)
    app.router.add_delete("/api/queue", clear_queue)
    app.router.add_post("/api/queue/order", reorder_queue)
    app.router.add_post("/api/queue/pause", pause_queue)
    app.router.add_post("/api/queue/resume", resume_queue)
    app.router.add_get("/api/nodes", node_catalogue)
    app.router.add_get("/api/models", model_lists)
    app.router.add_get("/api/files/{folder}", list_files)
    app.router.add_get("/api/files/{folder}/{path:.+}", download_file)
    app.router.add_post("/api/files/inputs", upload_input)
    app.router.add_get("/api/workflows", list_workflows)
    app.router.add_post("/api/workflows/convert", convert_workflow)
    app.router.add_get("/api/workflows/{name}", get_workflow)
    app.router.add_put("/api/workflows/{name}", save_workflow)
    app.router.add_get("/api/health", health)
    app.router.add_get("/api/workers", list_workers)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/api/events", event_stream)
    _editor_routes(app, Path(editor_dir))
    return app


def serve(registry: NodeRegistry, db_path: Path | str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          **options: Any) -> None:
    """Run the API server until interrupted; a non-loopback `host` lifts the loopback Host check."""
    options.setdefault("loopback_only", host in LOOPBACK_NAMES)
    if not options["loopback_only"] and not options.get("token"):
        raise ValueError(f"serving on {host} (beyond this machine) needs an access token")
    web.run_app(create_app(registry, db_path, **options), host=host, port=port, print=None)
