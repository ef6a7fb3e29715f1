"""Queue re-ordering and queue events, step previews over the WebSocket, the access token, the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import io
import re

import jsonschema
import pytest
from PIL import Image

from _server_fixtures import PICTURE_PACK_DIR, PICTURE_WORKFLOW, SUM, make_client_factory, submit, wait_status
from _server_fixtures import make_client, registry  # noqa: F401
from nodegraph.plugins import build_registry
from nodegraph.server import RunStore, openapi_document
from nodegraph.server.queue import QUEUE_EVENT_IDS


@pytest.mark.asyncio
async def test_reorder_the_queue(make_client):
    client = await make_client()
    await client.post("/api/queue/pause")
    ids = [await submit(client, SUM, outputs=[node]) for node in ("a", "b", "out")]
    response = await client.post("/api/queue/order", json={"order": [ids[2], ids[0]]})
    assert (await response.json()) == {"queued": [ids[2], ids[0], ids[1]]}
    assert (await (await client.get("/api/queue")).json()) == {"queued": [ids[2], ids[0], ids[1]], "queued_count": 3,
                                                               "running": None, "running_ids": [], "paused": True}

    response = await client.post("/api/queue/order", json={"order": [ids[1], "nope"]})
    assert response.status == 409 and (await response.json())["run_ids"] == ["nope"]
    assert (await client.post("/api/queue/order", json={"order": "x"})).status == 400
    twice = await client.post("/api/queue/order", json={"order": [ids[2], ids[2], ids[0]]})
    assert (await twice.json()) == {"queued": [ids[2], ids[0], ids[1]]}

    socket = await client.ws_connect("/api/events")
    assert (await socket.receive_json())["queued"] == [ids[2], ids[0], ids[1]]
    await client.post("/api/queue/resume")
    started = []
    while len(started) < 3:
        event = await asyncio.wait_for(socket.receive_json(), 5)
        if event["type"] == "run_started":
            started.append(event["run_id"])
    assert started == [ids[2], ids[0], ids[1]]
    await socket.close()


@pytest.mark.asyncio
async def test_queue_events_name_only_the_next_runs(make_client):
    client = await make_client()
    await client.post("/api/queue/pause")
    ids = [await submit(client, SUM, outputs=["a"]) for _ in range(QUEUE_EVENT_IDS + 3)]
    socket = await client.ws_connect("/api/events")
    state = await socket.receive_json()
    assert state["queued"] == ids[:QUEUE_EVENT_IDS] and state["queued_count"] == len(ids)
    assert (await (await client.get("/api/queue")).json())["queued"] == ids
    await socket.close()


def test_queue_order_survives_in_an_old_database(tmp_path):
    """A database written before runs had a rank gets one, keeping submission order."""
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as connection:
        connection.executescript("""
            CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
                workflow TEXT NOT NULL, outputs TEXT, created REAL NOT NULL, started REAL, finished REAL,
                seconds REAL, nodes TEXT NOT NULL DEFAULT '{}', files TEXT NOT NULL DEFAULT '[]', error TEXT);
            INSERT INTO runs (id, status, workflow, created) VALUES ('first', 'queued', '{}', 1), ('second', 'queued', '{}', 2);
        """)
    store = RunStore(db)
    store.add("third", SUM, None)
    assert store.queued_ids() == ["first", "second", "third"]
    store.set_queue_order(["third", "first", "second"])
    assert store.queued_ids() == ["third", "first", "second"]
    assert "rank" not in store.get("third")
    store.close()


@pytest.mark.asyncio
async def test_cancelling_queued_runs_is_announced(make_client):
    client = await make_client()
    await client.post("/api/queue/pause")
    first, second = await submit(client, SUM), await submit(client, SUM, outputs=["b"])
    socket = await client.ws_connect("/api/events")
    await socket.receive_json()
    await client.post(f"/api/runs/{first}/cancel")
    await client.delete("/api/queue")
    events = [await asyncio.wait_for(socket.receive_json(), 5) for _ in range(4)]
    assert [(e["type"], e["run_id"]) for e in events] == [
        ("run_cancelled", first), ("queue_changed", ""), ("run_cancelled", second), ("queue_changed", "")]
    assert events[-1]["queued"] == [] and events[-1]["paused"] is True
    await socket.close()


@pytest.mark.asyncio
async def test_previews_and_images_reach_the_websocket(aiohttp_client, tmp_path):
    registry, problems = build_registry([PICTURE_PACK_DIR], entry_points=False)
    assert problems == []
    client = await make_client_factory(aiohttp_client, registry, tmp_path)()
    socket = await client.ws_connect("/api/events")
    run_id = await submit(client, PICTURE_WORKFLOW)
    events = []
    while not events or events[-1]["type"] != "run_finished":
        events.append(await asyncio.wait_for(socket.receive_json(), 5))
    previews = [e for e in events if e["type"] == "node_preview"]
    assert [p["node_id"] for p in previews] == ["draw"] * 3
    header, data = previews[0]["image"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.format == "JPEG" and picture.size == (32, 24) == (previews[0]["width"], previews[0]["height"])

    finished = next(e for e in events if e["type"] == "node_finished" and e["node_id"] == "save")
    assert re.fullmatch(r"/api/files/outputs/picture_\d{5}\.png", finished["file_urls"][0])
    image = await client.get(finished["file_urls"][0])
    assert image.status == 200 and Image.open(io.BytesIO(await image.read())).size == (64, 48)
    run = await wait_status(client, run_id, ("succeeded",))
    assert run["file_urls"] == finished["file_urls"] == run["nodes"]["save"]["file_urls"]
    await socket.close()


@pytest.mark.asyncio
async def test_access_token(make_client):
    client = await make_client(token="s3cret", loopback_only=False)
    refused = await client.get("/api/runs")
    assert refused.status == 401 and (await refused.json())["error"] == "token_required"
    assert (await client.get("/api/runs", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/api/runs", headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await client.get("/api/events")).status == 401

    # Opening the page with ?token= sets a cookie that later requests (and the WebSocket) carry.
    opened = await client.get("/api/health?token=s3cret")
    assert opened.status == 200 and opened.cookies["nodegraph_token"].value == "s3cret"
    assert opened.cookies["nodegraph_token"]["httponly"]
    assert (await client.get("/api/runs")).status == 200
    socket = await client.ws_connect("/api/events")
    assert (await socket.receive_json())["type"] == "queue_changed"
    await socket.close()


@pytest.mark.asyncio
async def test_openapi_document_covers_every_route(make_client):
    client = await make_client()
    document = await (await client.get("/api/openapi.json")).json()
    assert document == openapi_document()
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    served = set()
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        if path.startswith("/api/") and route.method != "HEAD":
            served.add((path.replace("{path:.+}", "{path}"), route.method))
    assert served == documented
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)

    # Real responses match the documented schemas.
    def check(instance: dict, name: str) -> None:
        schema = {**document["components"]["schemas"][name], "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(instance)

    run_id = await submit(client, SUM)
    check(await wait_status(client, run_id, ("succeeded",)), "Run")
    check(await (await client.get("/api/queue")).json(), "Queue")
    check(await (await client.get("/api/nodes")).json(), "Catalogue")
    invalid = await client.post("/api/runs", json={"workflow": {"version": 1, "nodes": {"x": {"type": "Nope"}}}})
    check(await invalid.json(), "InvalidWorkflow")
    check(await (await client.get("/api/runs/nope")).json(), "Error")


@pytest.mark.asyncio
async def test_editor_page_is_served_with_a_content_policy(make_client, tmp_path):
    editor = tmp_path / "editor"
    (editor / "assets").mkdir(parents=True)
    (editor / "index.html").write_text("<!doctype html><title>nodegraph</title>")
    (editor / "assets" / "app.js").write_text("console.log(1)")
    client = await make_client(editor_dir=editor)
    page = await client.get("/")
    assert page.status == 200 and "nodegraph" in await page.text()
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert (await client.get("/assets/app.js")).status == 200

    missing = await make_client(editor_dir=tmp_path / "nothing")
    response = await missing.get("/")
    assert response.status == 404 and "npm run build" in await response.text()


@pytest.mark.asyncio
async def test_shutdown_closes_event_streams_promptly(make_client):
    """An open editor tab must not hold Ctrl-C up for the server's 60 s shutdown grace period."""
    import time

    client = await make_client()
    socket = await client.ws_connect("/api/events")
    await socket.receive_json()
    started = time.monotonic()
    await client.server.close()
    message = await asyncio.wait_for(socket.receive(), 5)
    assert message.extra == "server shutdown"
    assert time.monotonic() - started < 5
    await socket.close()
