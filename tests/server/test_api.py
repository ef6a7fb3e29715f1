"""The HTTP/WebSocket API over the run queue: submit, inspect, cancel, events, persistence, security."""

from __future__ import annotations

import asyncio
import sys

import pytest

from _server_fixtures import SUM, counting_pack, doc, link, make_client, registry, submit, wait_status  # noqa: F401
from nodegraph.server import RunStore


def slow(steps: int = 200, delay: float = 0.01, x: float = 0.0) -> dict:
    return doc(s=("Steps", {"steps": steps, "delay": delay, "x": x}), out=("Sink", {"value": link("s", "value")}))


@pytest.mark.asyncio
async def test_submit_runs_and_reports_result(make_client):
    client = await make_client()
    run_id = await submit(client, SUM)
    run = await wait_status(client, run_id, ("succeeded", "failed"))
    assert run["status"] == "succeeded"
    assert run["error"] is None
    assert run["started"] >= run["created"] and run["finished"] >= run["started"]
    assert {n: s["status"] for n, s in run["nodes"].items()} == {"a": "executed", "b": "executed", "out": "executed"}
    assert counting_pack.RUNS == {"a": 1, "b": 1, "out": 1}

    # The cache is shared across runs: the same workflow again runs nothing.
    again = await wait_status(client, await submit(client, SUM), ("succeeded",))
    assert {s["status"] for s in again["nodes"].values()} == {"cached"}
    assert counting_pack.RUNS == {"a": 1, "b": 1, "out": 1}

    listed = await (await client.get("/api/runs")).json()
    assert [r["id"] for r in listed["runs"]] == [run_id, again["id"]]
    assert "workflow" not in listed["runs"][0]


@pytest.mark.asyncio
async def test_failed_run_names_the_node(make_client):
    client = await make_client()
    run_id = await submit(client, doc(f=("Fail", {}), out=("Sink", {"value": link("f", "value")})))
    run = await wait_status(client, run_id, ("succeeded", "failed"))
    assert run["status"] == "failed"
    assert run["error"]["node_id"] == "f" and run["error"]["message"] == "boom"
    assert run["nodes"]["f"]["status"] == "failed"


@pytest.mark.asyncio
async def test_error_outside_nodes_fails_the_run_not_the_worker(make_client, tmp_path):
    client = await make_client()
    # ReadFile's fingerprint stats the file when the run starts, before any node runs.
    missing = tmp_path / "missing.txt"
    run_id = await submit(client, doc(r=("ReadFile", {"path": str(missing)}), out=("Sink", {"value": link("r", "text")})))
    run = await wait_status(client, run_id, ("succeeded", "failed"))
    assert run["status"] == "failed"
    assert run["error"]["exception"] == "FileNotFoundError" and str(missing) in run["error"]["message"]
    assert (await wait_status(client, await submit(client, SUM), ("succeeded", "failed")))["status"] == "succeeded"


@pytest.mark.asyncio
async def test_invalid_workflow_is_400_with_issues(make_client):
    client = await make_client()
    response = await client.post("/api/runs", json={"workflow": doc(
        a=("NoSuchNode", {}), b=("Value", {"value": 5000}), out=("Sink", {"value": link("b", "value")}))})
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_workflow"
    assert {issue["node_id"] for issue in body["issues"]} == {"a", "b"}
    listed = await (await client.get("/api/runs")).json()
    assert listed["runs"] == []

    response = await client.post("/api/runs", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400 and (await response.json())["error"] == "bad_json"
    response = await client.post("/api/runs", json={"nodes": {}})
    assert response.status == 400 and (await response.json())["error"] == "bad_request"


@pytest.mark.asyncio
async def test_unknown_run_is_404(make_client):
    client = await make_client()
    assert (await client.get("/api/runs/nope")).status == 404
    assert (await client.post("/api/runs/nope/cancel")).status == 404


async def wait_event(socket, kind: str, run_id: str, node_id: str | None = None) -> dict:
    """The next event of this type (for this run and node) on an event socket; earlier ones are skipped."""
    while True:
        event = await asyncio.wait_for(socket.receive_json(), 30)
        if event["type"] == kind and event["run_id"] == run_id and (node_id is None or event["node_id"] == node_id):
            return event


@pytest.mark.asyncio
async def test_cancel_queued_and_running(make_client):
    client = await make_client()
    socket = await client.ws_connect("/api/events")
    # The running node would take hours: it ends by being cancelled, however slow the machine.
    running = await submit(client, slow(steps=1_000_000, x=1))
    queued = await submit(client, slow(x=2))
    # Cancelled once its node has started (not merely once the run has), so it stops part way through it.
    await wait_event(socket, "node_started", running, "s")
    await socket.close()

    response = await client.post(f"/api/runs/{queued}/cancel")
    assert (await response.json())["status"] == "cancelled"
    response = await client.post(f"/api/runs/{running}/cancel")
    assert (await response.json())["status"] == "running"

    run = await wait_status(client, running, ("cancelled", "succeeded"))
    assert run["status"] == "cancelled"
    # It stopped part way through the node, and the sink never started.
    assert run["nodes"]["s"]["status"] == "cancelled" and run["nodes"]["s"]["progress"][0] < 1_000_000
    assert run["nodes"]["out"] == {"status": "pending"}
    assert (await wait_status(client, queued, ("cancelled",)))["started"] is None
    assert counting_pack.RUNS["s"] == 1


@pytest.mark.asyncio
async def test_workers_lists_the_local_executor_and_its_run(make_client):
    client = await make_client()
    assert (await (await client.get("/api/workers")).json()) == {"workers": [
        {"name": "local", "node_id": None, "ready": True, "run_id": None, "runs": 0}]}
    running = await submit(client, slow(steps=200, delay=0.01))
    await wait_status(client, running, ("running",))
    assert (await (await client.get("/api/workers")).json())["workers"][0]["run_id"] == running
    await client.post(f"/api/runs/{running}/cancel")
    run = await wait_status(client, running, ("cancelled",))
    assert run["worker"] == "local"
    # The outcome is stored just before the worker is freed.
    for _ in range(100):
        workers = (await (await client.get("/api/workers")).json())["workers"]
        if workers[0]["run_id"] is None:
            break
        await asyncio.sleep(0.02)
    assert workers == [{"name": "local", "node_id": None, "ready": True, "run_id": None, "runs": 1}]


@pytest.mark.asyncio
async def test_pause_resume_and_clear(make_client):
    client = await make_client()
    assert (await client.post("/api/queue/pause")).status == 200
    first = await submit(client, SUM)
    second = await submit(client, slow(steps=2, delay=0))
    await asyncio.sleep(0.1)
    assert (await (await client.get(f"/api/runs/{first}")).json())["status"] == "queued"
    assert (await (await client.get("/api/health")).json()) == {"ok": True, "paused": True, "queued": 2}

    response = await client.delete("/api/queue")
    assert (await response.json()) == {"cancelled": 2}
    third = await submit(client, SUM)
    await client.post("/api/queue/resume")
    assert (await wait_status(client, third, ("succeeded",)))["status"] == "succeeded"
    assert (await (await client.get(f"/api/runs/{second}")).json())["status"] == "cancelled"


@pytest.mark.asyncio
async def test_websocket_receives_run_events(make_client):
    client = await make_client()
    socket = await client.ws_connect("/api/events")
    run_id = await submit(client, slow(steps=3, delay=0))
    received = []
    while not received or received[-1]["type"] != "run_finished":
        received.append(await asyncio.wait_for(socket.receive_json(), 5))
    # The queue's state follows the run's end.
    queue_states = [e for e in received if e["type"] == "queue_changed"]
    queue_states.append(await asyncio.wait_for(socket.receive_json(), 5))
    await socket.close()
    run_events = [e for e in received if e["type"] != "queue_changed"]
    assert {event["run_id"] for event in run_events} == {run_id}
    assert [e["type"] for e in run_events if e["type"] != "node_progress"] == [
        "run_queued", "run_started", "node_started", "node_finished", "node_started", "node_finished", "run_finished"]
    # First the state on connecting, then queued, then running, then empty again.
    assert [(q["queued"], q["running"]) for q in queue_states] == [
        ([], None), ([run_id], None), ([], run_id), ([], None)]
    assert [(e["value"], e["max"]) for e in received if e["type"] == "node_progress"] == [(1, 3), (2, 3), (3, 3)]
    # The end event is sent after the result is stored.
    assert (await (await client.get(f"/api/runs/{run_id}")).json())["status"] == "succeeded"


@pytest.mark.asyncio
async def test_queue_and_history_survive_a_restart(make_client, tmp_path):
    db = tmp_path / "persist.sqlite"
    client = await make_client(db)
    done = await submit(client, SUM)
    await wait_status(client, done, ("succeeded",))
    await client.post("/api/queue/pause")
    waiting = [await submit(client, SUM, outputs=["b"]), await submit(client, slow(steps=2, delay=0))]
    await client.close()

    client = await make_client(db)
    listed = await (await client.get("/api/runs")).json()
    assert listed["paused"] is True
    assert [(r["id"], r["status"]) for r in listed["runs"]] == [
        (done, "succeeded"), (waiting[0], "queued"), (waiting[1], "queued")]
    finished = await (await client.get(f"/api/runs/{done}")).json()
    assert finished["nodes"]["out"]["status"] == "executed"

    await client.post("/api/queue/resume")
    for run_id in waiting:
        assert (await wait_status(client, run_id, ("succeeded", "failed")))["status"] == "succeeded"
    assert (await (await client.get(f"/api/runs/{waiting[0]}")).json())["outputs"] == ["b"]


@pytest.mark.asyncio
async def test_run_in_progress_at_shutdown_is_interrupted(make_client, tmp_path):
    db = tmp_path / "persist.sqlite"
    client = await make_client(db)
    run_id = await submit(client, slow(steps=500))
    await wait_status(client, run_id, ("running",))
    await client.close()

    client = await make_client(db)
    assert (await (await client.get(f"/api/runs/{run_id}")).json())["status"] == "interrupted"


@pytest.mark.asyncio
async def test_run_left_running_by_a_crash_is_interrupted(make_client, tmp_path):
    db = tmp_path / "crashed.sqlite"
    store = RunStore(db)  # what a killed process leaves behind: a run marked running
    store.add("crashed", SUM, None)
    store.update("crashed", status="running", started=1.0)
    store.close()

    client = await make_client(db)
    run = await (await client.get("/api/runs/crashed")).json()
    assert run["status"] == "interrupted" and run["finished"] is not None
    assert counting_pack.RUNS == {}


@pytest.mark.asyncio
async def test_oversized_body_is_413(make_client):
    client = await make_client(max_body_bytes=1024)
    response = await client.post("/api/runs", data=b"{" + b" " * 4096 + b"}",
                                 headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"


@pytest.mark.asyncio
async def test_foreign_origin_is_403(make_client):
    client = await make_client()
    response = await client.post("/api/runs", json={"workflow": SUM}, headers={"Origin": "https://evil.example"})
    assert response.status == 403
    assert (await (await client.get("/api/runs")).json())["runs"] == []
    response = await client.get("/api/events", headers={"Origin": "https://evil.example"})
    assert response.status == 403

    own = f"http://{client.server.host}:{client.server.port}"
    assert (await client.get("/api/health", headers={"Origin": own})).status == 200
    assert (await client.get("/api/health")).status == 200


@pytest.mark.asyncio
async def test_foreign_host_is_403(make_client):
    """DNS rebinding: a foreign name pointing at 127.0.0.1 sends its own Host and a matching Origin."""
    client = await make_client()
    headers = {"Host": "evil.example", "Origin": "http://evil.example"}
    response = await client.post("/api/runs", json={"workflow": SUM}, headers=headers)
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden_host"
    assert (await client.get("/api/health", headers={"Host": f"localhost:{client.server.port}"})).status == 200


@pytest.mark.asyncio
async def test_node_catalogue(make_client):
    client = await make_client()
    catalogue = await (await client.get("/api/nodes")).json()
    assert set(catalogue["nodes"]) == {cls.type_name for cls in counting_pack.NODES}
    assert "steps" in catalogue["nodes"]["Steps"]["inputs"]


def test_serve_command_listens_on_localhost(tmp_path):
    import json
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "nodegraph", "serve", "--port", str(port), "--db",
                                str(tmp_path / "runs.sqlite"), "--nodes-dir", str(tmp_path)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90  # imports all packs (torch) on a busy machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as response:
                    health = json.load(response)
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        assert health == {"ok": True, "paused": False, "queued": 0}
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert (tmp_path / "runs.sqlite").exists()


def test_serve_beyond_loopback_prints_and_requires_a_token(tmp_path):
    import re
    import signal
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))  # any loopback address other than the default counts as "beyond"
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "nodegraph", "serve", "--listen", "127.0.0.2", "--port", str(port),
                                "--db", str(tmp_path / "runs.sqlite"), "--nodes-dir", str(tmp_path)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 90  # imports all packs (torch) on a busy machine
        while not any("serving on" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, lines
            lines.append(process.stderr.readline())
        address = re.search(r"serving on (\S+)", "".join(lines)).group(1)
        token = re.fullmatch(rf"http://127\.0\.0\.2:{port}/\?token=([\w-]{{40,}})", address).group(1)
        base = f"http://127.0.0.2:{port}"
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/health", timeout=1)
                raise AssertionError("served without the token")
            except urllib.error.HTTPError as error:
                assert error.code == 401
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        request = urllib.request.Request(f"{base}/api/health", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
