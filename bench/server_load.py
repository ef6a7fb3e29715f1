"""Load test of `nodegraph serve` on loopback: many clients submitting, many listening (prints JSON).

    python bench/server_load.py [--runs 200] [--clients 20] [--listeners 20] [--timeout 600]

Starts a real server in a child process (fresh database and folders in a temporary directory),
connects the WebSocket listeners, then submits `--runs` small arithmetic workflows (four nodes
of the basic pack, each run with its own numbers so nothing is served from the cache) from
`--clients` concurrent HTTP clients. It checks that every run succeeds exactly once, that no run
is lost or duplicated, and that every listener saw every event of every run, in the same order
as the others. Reports throughput (runs finished per second, first submit to last run_finished), submit
latency percentiles, the server's CPU time per run, and the machine's load average (the first
two depend on it). Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp


def workflow(number: int) -> dict:
    """Four basic nodes; `number` makes every run's cache keys its own."""
    return {"version": 1, "nodes": {
        "n": {"type": "Integer", "inputs": {"value": number}},
        "double": {"type": "Math", "inputs": {"a": {"from": "n", "output": "value"}, "b": 2, "operation": "multiply"}},
        "text": {"type": "FormatText", "inputs": {"template": "{a}", "a": {"from": "double", "output": "result"}}},
        "save": {"type": "SaveText", "inputs": {"text": {"from": "text", "output": "text"}, "filename_prefix": "load"}},
    }}


EXPECTED_TYPES = (["run_queued", "run_started"] + ["node_started", "node_finished"] * 4 + ["run_finished"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nodegraph", "serve", "--port", str(port), "--db", str(folder / "runs.sqlite"),
         "--output-dir", str(folder / "outputs"), "--inputs-dir", str(folder / "inputs"),
         "--workflows-dir", str(folder / "workflows"), "--nodes-dir", str(folder / "no-packs"), "--device", "cpu"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_until_up(session: aiohttp.ClientSession, base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            async with session.get(f"{base}/api/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read() if process.stderr else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start within 180 s")
        await asyncio.sleep(0.2)


class Listener:
    """One WebSocket client recording every run event it receives."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.finished: set[str] = set()
        self.changed = asyncio.Event()

    async def listen(self, session: aiohttp.ClientSession, base: str, ready: asyncio.Event) -> None:
        async with session.ws_connect(f"{base.replace('http', 'ws', 1)}/api/events", max_msg_size=0) as socket:
            ready.set()
            async for message in socket:
                event = json.loads(message.data)
                if event["type"] == "queue_changed":
                    continue
                self.events[event["run_id"]].append((event["type"], event["node_id"]))
                if event["type"] in ("run_finished", "run_failed", "run_cancelled"):
                    self.finished.add(event["run_id"])
                    self.changed.set()


async def client(session: aiohttp.ClientSession, base: str, numbers: list[int], latencies: list[float],
                 submitted: list[str]) -> None:
    for number in numbers:
        started = time.perf_counter()
        async with session.post(f"{base}/api/runs", json={"workflow": workflow(number)}) as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"submit failed with {response.status}: {body}")
        latencies.append(time.perf_counter() - started)
        submitted.append(body["id"])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def measure(runs: int, clients: int, listeners: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="nodegraph-load-") as tmp:
        folder = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        process = start_server(folder, port)
        connector = aiohttp.TCPConnector(limit=clients + listeners + 4)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                await wait_until_up(session, base, process)
                watchers = [Listener() for _ in range(listeners)]
                ready = [asyncio.Event() for _ in watchers]
                listening = [asyncio.create_task(w.listen(session, base, r)) for w, r in zip(watchers, ready)]
                await asyncio.gather(*(r.wait() for r in ready))

                latencies: list[float] = []
                submitted: list[str] = []
                shares = [list(range(i, runs, clients)) for i in range(clients)]
                cpu_before = cpu_seconds(process.pid)
                started = time.perf_counter()
                await asyncio.gather(*(client(session, base, share, latencies, submitted) for share in shares))
                submitting = time.perf_counter() - started

                deadline = time.monotonic() + timeout
                while not all(w.finished >= set(submitted) for w in watchers):
                    if time.monotonic() > deadline:
                        break
                    for w in watchers:
                        w.changed.clear()
                    await asyncio.wait([asyncio.create_task(w.changed.wait()) for w in watchers], timeout=1.0)
                elapsed = time.perf_counter() - started
                cpu_after = cpu_seconds(process.pid)

                async with session.get(f"{base}/api/runs") as response:
                    stored = (await response.json())["runs"]
                for task in listening:
                    task.cancel()
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    statuses = Counter(run["status"] for run in stored)
    stored_ids = [run["id"] for run in stored]
    reference = {run_id: watchers[0].events.get(run_id, []) for run_id in submitted}
    problems = []
    if len(set(submitted)) != runs:
        problems.append(f"{runs - len(set(submitted))} duplicate run ids returned on submit")
    if sorted(stored_ids) != sorted(submitted):
        problems.append(f"stored runs differ from submitted: {len(stored_ids)} stored, {len(submitted)} submitted")
    if statuses != Counter({"succeeded": runs}):
        problems.append(f"run statuses: {dict(statuses)}")
    for index, watcher in enumerate(watchers):
        for run_id in submitted:
            seen = watcher.events.get(run_id, [])
            if [kind for kind, _ in seen if kind != "node_progress"] != EXPECTED_TYPES:
                problems.append(f"listener {index} saw run {run_id[:8]} as {[kind for kind, _ in seen]}")
                break
            if seen != reference[run_id]:
                problems.append(f"listener {index} saw run {run_id[:8]} differently from listener 0")
                break
        unknown = set(watcher.events) - set(submitted)
        if unknown:
            problems.append(f"listener {index} saw events of {len(unknown)} runs nobody submitted")

    events_per_listener = sum(len(events) for events in watchers[0].events.values())
    return {
        "benchmark": "server_load",
        "runs": runs, "clients": clients, "listeners": listeners,
        "succeeded": statuses.get("succeeded", 0),
        "lost": len(set(submitted) - set(stored_ids)), "duplicated": len(stored_ids) - len(set(stored_ids)),
        "every_listener_saw_every_event": not any("listener" in p for p in problems),
        "run_events_per_listener": events_per_listener,
        "seconds_total": round(elapsed, 3),
        "seconds_submitting": round(submitting, 3),
        "throughput_runs_per_s": round(runs / elapsed, 2),
        # CPU the server process spent per run (HTTP, validation, running, events to every listener):
        # the figure that does not depend on what else the machine is doing.
        "server_cpu_ms_per_run": (None if cpu_before is None or cpu_after is None
                                  else round(1000 * (cpu_after - cpu_before) / runs, 2)),
        "submit_latency_ms": {"p50": round(1000 * statistics.median(latencies), 2),
                              "p95": round(1000 * percentile(latencies, 0.95), 2),
                              "max": round(1000 * max(latencies), 2)},
        "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "problems": problems,
        "ok": not problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--listeners", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the runs after submitting")
    args = parser.parse_args()
    result = asyncio.run(measure(args.runs, args.clients, args.listeners, args.timeout))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
