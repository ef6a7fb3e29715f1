"""Load test of `nodegraph serve` on loopback: many clients submitting, many listening, one
listener that never reads (prints JSON).

    python bench/server_load.py [--runs 200] [--clients 20] [--listeners 20] [--stalled 1]
                                [--flood-runs 3] [--flood-nodes 3000] [--timeout 600]

Starts a real server in a child process (fresh database and folders in a temporary directory),
connects the WebSocket listeners and `--stalled` clients that open the event stream and then
never read (a 4 KiB receive buffer), then submits `--runs` small arithmetic workflows (four nodes
of the basic pack, each run with its own numbers so nothing is served from the cache) from
`--clients` concurrent HTTP clients, then `--flood-runs` chains of `--flood-nodes` nodes (two
events per node: enough to fill any stalled client's buffers). It checks that every run succeeds
exactly once, that no run is lost or duplicated, and that every healthy listener saw every event
of every run, in the same order as the others, however the stalled clients fare. Reports runs
lost and duplicated, events missed per listener, how late run ends reached the listeners, what
became of the stalled clients, submit latency percentiles (p50, p95, p99), throughput, the
server's CPU time per run and its peak memory, and the machine's load average. Exits 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import struct
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


def flood_workflow(number: int, nodes: int) -> dict:
    """A chain of `nodes` basic nodes (a number, additions, its text, saved): two events per node."""
    chain: dict = {"n0": {"type": "Integer", "inputs": {"value": number}}}
    previous = {"from": "n0", "output": "value"}
    for index in range(1, nodes - 2):
        chain[f"n{index}"] = {"type": "Math", "inputs": {"a": previous, "b": 1, "operation": "add"}}
        previous = {"from": f"n{index}", "output": "result"}
    chain["text"] = {"type": "FormatText", "inputs": {"template": "{a}", "a": previous}}
    chain["save"] = {"type": "SaveText", "inputs": {"text": {"from": "text", "output": "text"}, "filename_prefix": "flood"}}
    return {"version": 1, "nodes": chain}


def expected_types(nodes: int) -> list[str]:
    return ["run_queued", "run_started"] + ["node_started", "node_finished"] * nodes + ["run_finished"]


EXPECTED_TYPES = expected_types(4)


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
    """One WebSocket client recording every run event it receives, and how late each run's end arrived."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.finished: set[str] = set()
        self.end_delays: list[float] = []
        self.closed = False
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
                    self.end_delays.append(time.time() - event["time"])
                    self.finished.add(event["run_id"])
                    self.changed.set()
        self.closed = True
        self.changed.set()


class StalledClient:
    """A client that opens the event stream and never reads it, with a small receive buffer."""

    def __init__(self, port: int) -> None:
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window it offers
        self.raw.settimeout(30)
        self.raw.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.raw.sendall((f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          ).encode())
        answer = b""
        while b"\r\n\r\n" not in answer:  # the handshake answer only, byte by byte: nothing of the stream
            answer += self.raw.recv(1)
        if not answer.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"event stream refused: {answer!r}")

    def outcome(self, idle: float = 15.0) -> dict:
        """Read what the server left for it: its close frame (code, reason), or how the connection ended.
        A server that gave up on it longer ago than its close grace dropped the connection: the
        reason was never read, and the stream simply ends after what the kernel still held."""
        self.raw.settimeout(idle)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # reading now: as fast as it can
        buffer, frames = b"", 0
        try:
            while True:
                while True:  # parse every whole frame in the buffer
                    if len(buffer) < 2:
                        break
                    length, offset = buffer[1] & 0x7F, {126: 4, 127: 10}.get(buffer[1] & 0x7F, 2)
                    if len(buffer) < offset:
                        break
                    if offset > 2:
                        length = int.from_bytes(buffer[2:offset], "big")
                    if len(buffer) < offset + length:
                        break
                    opcode, payload = buffer[0] & 0x0F, buffer[offset:offset + length]
                    buffer = buffer[offset + length:]
                    if opcode == 0x8:
                        return {"disconnected": True, "close_code": struct.unpack("!H", payload[:2])[0],
                                "close_reason": payload[2:].decode(), "messages_before": frames}
                    frames += opcode == 0x1
                chunk = self.raw.recv(1 << 20)
                if not chunk:
                    return {"disconnected": True, "close_code": None, "close_reason": "dropped after the close "
                            "grace, its close frame unread", "messages_before": frames}
                buffer += chunk
        except TimeoutError:
            return {"disconnected": False, "messages_before": frames}
        except ConnectionResetError:
            return {"disconnected": True, "close_code": None, "close_reason": "connection reset", "messages_before": frames}
        finally:
            self.raw.close()


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident memory of a process so far (Linux /proc; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def client(session: aiohttp.ClientSession, base: str, numbers: list[int], latencies: list[float],
                 submitted: list[str], make=workflow) -> None:
    for number in numbers:
        started = time.perf_counter()
        async with session.post(f"{base}/api/runs", json={"workflow": make(number)}) as response:
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


async def measure(runs: int, clients: int, listeners: int, stalled_count: int, flood_runs: int, flood_nodes: int,
                  timeout: float) -> dict:
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
                stalled = [StalledClient(port) for _ in range(stalled_count)]
                rss_idle = peak_rss_mb(process.pid)

                latencies: list[float] = []
                submitted: list[str] = []
                shares = [list(range(i, runs, clients)) for i in range(clients)]
                cpu_before = cpu_seconds(process.pid)
                started = time.perf_counter()
                await asyncio.gather(*(client(session, base, share, latencies, submitted) for share in shares))
                submitting = time.perf_counter() - started
                flooded: list[str] = []
                await client(session, base, list(range(runs, runs + flood_runs)), [], flooded,
                             lambda number: flood_workflow(number, flood_nodes))
                submitted += flooded

                deadline = time.monotonic() + timeout
                while not all(w.finished >= set(submitted) or w.closed for w in watchers):
                    if time.monotonic() > deadline:
                        break
                    for w in watchers:
                        w.changed.clear()
                    await asyncio.wait([asyncio.create_task(w.changed.wait()) for w in watchers], timeout=1.0)
                elapsed = time.perf_counter() - started
                cpu_after = cpu_seconds(process.pid)
                rss_peak = peak_rss_mb(process.pid)

                async with session.get(f"{base}/api/runs") as response:
                    stored = (await response.json())["runs"]
                for task in listening:
                    task.cancel()
                stalled_outcomes = [await asyncio.to_thread(s.outcome) for s in stalled]
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    total_runs = runs + flood_runs
    expected = {run_id: EXPECTED_TYPES for run_id in submitted}
    expected.update({run_id: expected_types(flood_nodes) for run_id in flooded})
    statuses = Counter(run["status"] for run in stored)
    stored_ids = [run["id"] for run in stored]
    reference = {run_id: watchers[0].events.get(run_id, []) for run_id in submitted}
    problems = []
    if len(set(submitted)) != total_runs:
        problems.append(f"{total_runs - len(set(submitted))} duplicate run ids returned on submit")
    if sorted(stored_ids) != sorted(submitted):
        problems.append(f"stored runs differ from submitted: {len(stored_ids)} stored, {len(submitted)} submitted")
    if statuses != Counter({"succeeded": total_runs}):
        problems.append(f"run statuses: {dict(statuses)}")
    missed = [sum(max(0, len(expected[run_id]) - len(watcher.events.get(run_id, []))) for run_id in submitted)
              for watcher in watchers]
    if any(missed):
        problems.append(f"listeners missed events: {missed}")
    for index, watcher in enumerate(watchers):
        for run_id in submitted:
            seen = watcher.events.get(run_id, [])
            if [kind for kind, _ in seen if kind != "node_progress"] != expected[run_id]:
                problems.append(f"listener {index} saw run {run_id[:8]} as {[kind for kind, _ in seen][:12]}...")
                break
            if seen != reference[run_id]:
                problems.append(f"listener {index} saw run {run_id[:8]} differently from listener 0")
                break
        unknown = set(watcher.events) - set(submitted)
        if unknown:
            problems.append(f"listener {index} saw events of {len(unknown)} runs nobody submitted")

    events_per_listener = sum(len(events) for events in watchers[0].events.values())
    end_delays = [delay for watcher in watchers for delay in watcher.end_delays]
    return {
        "benchmark": "server_load",
        "runs": total_runs, "small_runs": runs, "flood_runs": flood_runs, "flood_nodes": flood_nodes,
        "clients": clients, "listeners": listeners, "stalled_listeners": stalled_count,
        "succeeded": statuses.get("succeeded", 0),
        "lost": len(set(submitted) - set(stored_ids)), "duplicated": len(stored_ids) - len(set(stored_ids)),
        "every_listener_saw_every_event": not any("listener" in p for p in problems),
        "run_events_per_listener": events_per_listener,
        "events_missed_per_listener": missed,
        "listeners_disconnected": [index for index, watcher in enumerate(watchers) if watcher.closed],
        # From a run's end (the end event's time) to its arrival at a healthy listener.
        "run_end_delay_s": {"p50": round(statistics.median(end_delays), 3) if end_delays else None,
                            "max": round(max(end_delays), 3) if end_delays else None},
        "stalled": stalled_outcomes,
        "server_peak_rss_mb": {"idle": rss_idle, "end": rss_peak},
        "seconds_total": round(elapsed, 3),
        "seconds_submitting": round(submitting, 3),
        "throughput_runs_per_s": round(runs / elapsed, 2),
        # CPU the server process spent per run (HTTP, validation, running, events to every listener):
        # the figure that does not depend on what else the machine is doing.
        "server_cpu_ms_per_run": (None if cpu_before is None or cpu_after is None
                                  else round(1000 * (cpu_after - cpu_before) / runs, 2)),
        "submit_latency_ms": {"p50": round(1000 * statistics.median(latencies), 2),
                              "p95": round(1000 * percentile(latencies, 0.95), 2),
                              "p99": round(1000 * percentile(latencies, 0.99), 2),
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
    parser.add_argument("--stalled", type=int, default=1, help="event clients that never read")
    parser.add_argument("--flood-runs", type=int, default=3, help="large runs after the small ones")
    parser.add_argument("--flood-nodes", type=int, default=3000, help="nodes of each large run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the runs after submitting")
    args = parser.parse_args()
    result = asyncio.run(measure(args.runs, args.clients, args.listeners, args.stalled, args.flood_runs,
                                 args.flood_nodes, args.timeout))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
