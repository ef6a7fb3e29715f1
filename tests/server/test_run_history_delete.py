"""DELETE /api/runs/{id}: a finished run leaves the history (its files stay); a queued or running one
is refused until cancelled; every client is told; the deletion outlives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from _server_fixtures import (PICTURE_PACK_DIR, PICTURE_WORKFLOW, SUM, doc, link, make_client_factory, submit,
                              wait_status)
from _server_fixtures import make_client, registry  # noqa: F401
from nodegraph.plugins import build_registry
from nodegraph.server import RunNotFinished, RunStore, UnknownRun


def slow(steps: int = 1_000_000) -> dict:
    """A run whose node takes hours unless cancelled."""
    return doc(s=("Steps", {"steps": steps, "delay": 0.01}), out=("Sink", {"value": link("s", "value")}))


async def next_event(socket, kind: str, run_id: str) -> dict:
    while True:
        event = await asyncio.wait_for(socket.receive_json(), 10)
        if event["type"] == kind and event["run_id"] == run_id:
            return event


async def run_ids(client) -> list[str]:
    return [run["id"] for run in (await (await client.get("/api/runs")).json())["runs"]]


@pytest.mark.asyncio
async def test_a_finished_run_is_deleted_and_its_files_stay(aiohttp_client, tmp_path):
    pictures, problems = build_registry([PICTURE_PACK_DIR], entry_points=False)
    assert problems == []
    client = await make_client_factory(aiohttp_client, pictures, tmp_path)()
    socket = await client.ws_connect("/api/events")
    kept = await submit(client, PICTURE_WORKFLOW)
    gone = await submit(client, PICTURE_WORKFLOW)
    run = await wait_status(client, gone, ("succeeded", "failed"))
    assert run["status"] == "succeeded" and len(run["files"]) == 1
    await wait_status(client, kept, ("succeeded",))
    picture = Path(run["files"][0])
    assert picture.is_file()

    response = await client.delete(f"/api/runs/{gone}")
    assert response.status == 200
    assert await response.json() == {"id": gone, "deleted": True}
    assert (await next_event(socket, "run_deleted", gone))["node_id"] is None
    assert (await client.get(f"/api/runs/{gone}")).status == 404
    assert await run_ids(client) == [kept]
    assert picture.is_file()  # the record goes, the image stays
    assert (await client.get(run["file_urls"][0])).status == 200

    again = await client.delete(f"/api/runs/{gone}")
    assert again.status == 404 and (await again.json())["error"] == "unknown_run"
    # Odd ids are unknown runs too, answered in JSON; none deletes anything.
    for odd in ("%27%20OR%201%3D1%20--", "x" * 2000, "%E2%80%AE%00"):
        response = await client.delete(f"/api/runs/{odd}")
        assert response.status == 404 and (await response.json())["error"] == "unknown_run"
    assert await run_ids(client) == [kept]
    await socket.close()


@pytest.mark.asyncio
async def test_queued_and_running_runs_must_be_cancelled_first(make_client):
    client = await make_client()
    socket = await client.ws_connect("/api/events")
    running = await submit(client, slow())
    queued = await submit(client, SUM)
    await next_event(socket, "node_started", running)

    for run_id, status in ((running, "running"), (queued, "queued")):
        response = await client.delete(f"/api/runs/{run_id}")
        assert response.status == 409
        body = await response.json()
        assert body["error"] == "run_not_finished" and body["status"] == status
        assert "cancel it first" in body["message"]
    assert await run_ids(client) == [running, queued]

    await client.post(f"/api/runs/{queued}/cancel")
    await client.post(f"/api/runs/{running}/cancel")
    await wait_status(client, running, ("cancelled",))
    for run_id in (queued, running):
        assert (await client.delete(f"/api/runs/{run_id}")).status == 200
    assert await run_ids(client) == []
    await socket.close()


@pytest.mark.asyncio
async def test_a_deletion_outlives_a_restart(make_client, tmp_path):
    db = tmp_path / "history.sqlite"
    client = await make_client(db)
    first, second = await submit(client, SUM), await submit(client, SUM)
    await wait_status(client, second, ("succeeded",))
    assert (await client.delete(f"/api/runs/{first}")).status == 200
    await client.close()

    client = await make_client(db)
    assert await run_ids(client) == [second]


def test_the_store_deletes_only_finished_runs(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    for run_id, status in (("waiting", "queued"), ("busy", "running"), ("done", "succeeded"), ("broken", "failed"),
                           ("stopped", "cancelled"), ("cut", "interrupted")):
        store.add(run_id, SUM, None)
        store.update(run_id, status=status)
    for run_id in ("done", "broken", "stopped", "cut"):
        store.delete_finished(run_id)
    for run_id, status in (("waiting", "queued"), ("busy", "running")):
        with pytest.raises(RunNotFinished) as refused:
            store.delete_finished(run_id)
        assert refused.value.status == status
    with pytest.raises(UnknownRun):
        store.delete_finished("done")
    assert [run["id"] for run in store.list()] == ["waiting", "busy"]
    store.close()
