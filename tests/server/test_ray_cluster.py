"""The Ray worker pool follows its cluster: a machine that joins gets workers, one that leaves loses them."""

from __future__ import annotations

import threading
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs Ray: pip install 'nodegraph[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from _ray_fixtures import OBJECT_STORE_BYTES, WAIT, wait_until  # noqa: E402
from nodegraph import events as ev  # noqa: E402
from nodegraph.executor import Executor  # noqa: E402
from nodegraph.plugins import build_registry  # noqa: E402
from nodegraph.server.queue import RunQueue, RunStore  # noqa: E402
from nodegraph.server.ray_backend import RayBackend, RayPoolConfig  # noqa: E402


def counting(number: int) -> dict[str, Any]:
    return {"version": 1, "nodes": {
        "n": {"type": "Integer", "inputs": {"value": number}},
        "text": {"type": "FormatText", "inputs": {"template": "{a}", "a": {"from": "n", "output": "value"}}},
        "save": {"type": "SaveText", "inputs": {"text": {"from": "text", "output": "text"}}}}}


@pytest.fixture
def cluster():
    """Two machines' worth of Ray on this one: a head with one CPU; `add_node` adds another."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": OBJECT_STORE_BYTES})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_workers_follow_machines_joining_and_leaving(cluster, tmp_path):
    registry, _ = build_registry([])
    backend = RayBackend(RayPoolConfig(device="cpu", workers_per_node=1, poll_seconds=0.2))
    queue = RunQueue(Executor(registry, device="cpu", output_dir=tmp_path / "outputs"), RunStore(tmp_path / "runs.sqlite"),
                     backend)
    ended: list[str] = []
    changed = threading.Condition()

    def listen(event: ev.Event) -> None:
        if event.type in ev.RUN_ENDED:
            with changed:
                ended.append(event.run_id)
                changed.notify_all()

    def ready() -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in backend.workers() if w["ready"]}

    queue.subscribe(listen)
    queue.start()
    try:
        head = wait_until(lambda: list(ready().values()), "the head's worker")
        assert len(head) == 1

        joined = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
        workers = wait_until(lambda: len(ready()) == 2 and ready(), "a worker on the new machine")
        assert {w["node_id"] for w in workers.values()} == {head[0]["node_id"], joined.node_id}

        queue.pause()  # both queued before either is placed: one per machine
        ids = [queue.submit(counting(number)) for number in (1, 2)]
        queue.resume()
        with changed:
            assert changed.wait_for(lambda: set(ids) <= set(ended), WAIT)
        runs = [queue.get(run_id) for run_id in ids]
        assert [run["status"] for run in runs] == ["succeeded"] * 2
        assert {run["worker"] for run in runs} == set(workers)

        cluster.remove_node(joined)
        wait_until(lambda: list(ready()) == [head[0]["name"]], "the pool to forget the machine that left")
    finally:
        queue.stop()
        queue.store.close()
