"""The executor: demand-driven runs, the cross-run cache, failures, cancellation and events."""

from __future__ import annotations

import os
import threading
import time

from counting_pack import doc, link
from nodegraph import events as ev
from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.node import CancelToken


def chain_doc(x=1.0, y=2.0, z=3.0):
    """x -> s1 = x + y -> s2 = s1 + z -> out; y and z are their own nodes."""
    return doc(
        x=("Value", {"value": x}),
        y=("Value", {"value": y}),
        z=("Value", {"value": z}),
        s1=("Add", {"a": link("x", "value"), "b": link("y", "value")}),
        s2=("Add", {"a": link("s1", "sum"), "b": link("z", "value")}),
        out=("Sink", {"value": link("s2", "sum")}),
    )


def test_first_run_executes_everything_needed_once(executor, runs):
    result = executor.run(chain_doc())
    assert result.status == "succeeded"
    assert result.results["out"].outputs.value == 6.0
    assert dict(runs) == {n: 1 for n in ("x", "y", "z", "s1", "s2", "out")}


def test_unchanged_rerun_executes_nothing(executor, runs):
    executor.run(chain_doc())
    runs.clear()
    result = executor.run(chain_doc())
    assert dict(runs) == {}
    assert result.executed == []
    assert result.results["out"].outputs.value == 6.0


def test_changing_one_literal_reruns_exactly_it_and_its_descendants(executor, runs):
    executor.run(chain_doc())
    runs.clear()
    result = executor.run(chain_doc(y=5.0))
    assert set(runs) == {"y", "s1", "s2", "out"}
    assert all(count == 1 for count in runs.values())
    assert result.results["out"].outputs.value == 9.0
    runs.clear()
    executor.run(chain_doc(z=10.0))
    assert set(runs) == {"z", "s2", "out"}


def test_only_nodes_the_outputs_need_run(executor, runs):
    data = chain_doc()
    data["nodes"]["other"] = {"type": "Value", "inputs": {"value": 7}}
    executor.run(data)
    assert "other" not in runs
    runs.clear()
    result = executor.run(data, outputs=["other"])
    assert set(runs) == {"other"}
    assert result.results["other"].outputs.value == 7


def test_cached_output_node_means_its_ancestors_are_not_even_fetched(executor, runs):
    executor.run(chain_doc())
    runs.clear()
    result = executor.run(chain_doc())
    assert list(result.results) == ["out"]
    assert result.cached == ["out"]


def test_node_ids_do_not_matter_to_the_cache(executor, runs):
    executor.run(doc(a=("Value", {"value": 4}), b=("Sink", {"value": link("a", "value")})))
    runs.clear()
    executor.run(doc(renamed=("Value", {"value": 4}), sink2=("Sink", {"value": link("renamed", "value")})))
    assert dict(runs) == {}


def test_two_workflows_share_a_common_node(executor, runs):
    first = doc(m=("LoadModel", {"name": "sd"}), u=("UseModel", {"model": link("m", "model"), "scale": 1}),
                s=("Sink", {"value": link("u", "image")}))
    second = doc(load=("LoadModel", {"name": "sd"}), use=("UseModel", {"model": link("load", "model"), "scale": 2}),
                 save=("Sink", {"value": link("use", "image")}))
    one = executor.run(first)
    runs.clear()
    two = executor.run(second)
    assert set(runs) == {"use", "save"}  # the loader ran once, for both workflows
    assert two.results["save"].outputs.value == ("sd", 2.0)
    assert one.results["s"].outputs.value == ("sd", 1.0)
    runs.clear()
    executor.run(first)
    assert dict(runs) == {}


def test_changed_fingerprint_reruns_the_node(executor, runs, tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("one")
    data = doc(r=("ReadFile", {"path": str(path)}), s=("Sink", {"value": link("r", "text")}))
    executor.run(data)
    runs.clear()
    executor.run(data)
    assert dict(runs) == {}
    path.write_text("two!")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    result = executor.run(data)
    assert set(runs) == {"r", "s"}
    assert result.results["s"].outputs.value == "two!"


def test_never_cache_node_always_runs_with_its_descendants(executor, runs):
    data = doc(r=("RandomValue", {}), a=("Add", {"a": link("r", "value")}), s=("Sink", {"value": link("a", "sum")}))
    executor.run(data)
    runs.clear()
    executor.run(data)
    assert set(runs) == {"r", "a", "s"}


def test_byte_bound_evicts_least_recently_used(registry, tmp_path, runs):
    executor = Executor(registry, OutputCache(max_bytes=25_000), output_dir=tmp_path)

    def blob(tag):
        return doc(b=("Blob", {"size": 10_000, "tag": tag}), s=("Sink", {"value": {"from": "b", "output": "data"}}))

    executor.run(blob("one"))
    executor.run(blob("two"))  # two blobs of 10 kB fit, with their sinks
    assert executor.cache.total_bytes <= 25_000
    runs.clear()
    executor.run(blob("one"))
    assert dict(runs) == {}  # still cached; now "one" is the most recently used
    executor.run(blob("three"))  # evicts "two", the least recently used
    assert executor.cache.evictions >= 1
    assert executor.cache.total_bytes <= 25_000
    runs.clear()
    executor.run(blob("one"))
    assert dict(runs) == {}
    executor.run(blob("two"))
    assert runs["b"] == 1


def test_failing_node_names_itself_and_keeps_finished_outputs(executor, runs):
    data = doc(x=("Value", {"value": 2}), f=("Fail", {"x": link("x", "value")}), s=("Sink", {"value": link("f", "value")}))
    events = []
    result = executor.run(data, on_event=events.append)
    assert result.status == "failed"
    assert result.error.node_id == "f"
    assert result.error.node_type == "Fail"
    assert isinstance(result.error.error, RuntimeError)
    assert "boom" in result.error.traceback
    failed = [e for e in events if e.type == ev.NODE_FAILED]
    assert failed[0].node_id == "f" and failed[0].data["exception"] == "RuntimeError"
    assert events[-1].type == ev.RUN_FAILED
    runs.clear()
    executor.run(data)
    assert set(runs) == {"f"}  # x stayed cached


def test_linked_value_is_validated_at_run_time(executor, runs):
    # Steps.steps has ge=1; a link delivering 0 must fail with the input named.
    data = doc(n=("Count", {"value": 0}), s=("Steps", {"steps": link("n", "value")}),
               out=("Sink", {"value": link("s", "value")}))
    result = executor.run(data)
    assert result.status == "failed"
    assert result.error.node_id == "s"
    assert "'steps'" in str(result.error)


def test_events_of_a_run_in_order(executor):
    events = []
    executor.run(doc(s=("Steps", {"steps": 3}), out=("Sink", {"value": link("s", "value")})), on_event=events.append)
    kinds = [(e.type, e.node_id) for e in events]
    assert kinds == [
        (ev.RUN_STARTED, None),
        (ev.NODE_STARTED, "s"), (ev.NODE_PROGRESS, "s"), (ev.NODE_PROGRESS, "s"), (ev.NODE_PROGRESS, "s"),
        (ev.NODE_FINISHED, "s"),
        (ev.NODE_STARTED, "out"), (ev.NODE_FINISHED, "out"),
        (ev.RUN_FINISHED, None),
    ]
    assert [e.data["value"] for e in events if e.type == ev.NODE_PROGRESS] == [1, 2, 3]
    assert len({e.run_id for e in events}) == 1
    events.clear()
    executor.run(doc(s=("Steps", {"steps": 3}), out=("Sink", {"value": link("s", "value")})), on_event=events.append)
    assert [(e.type, e.node_id) for e in events] == [(ev.RUN_STARTED, None), (ev.NODE_CACHED, "out"),
                                                      (ev.RUN_FINISHED, None)]


def test_cancellation_stops_a_long_node_within_one_step(executor, runs):
    cancel = CancelToken()
    progress = []

    def on_event(event):
        if event.type == ev.NODE_PROGRESS:
            progress.append(event.data["value"])
            if event.data["value"] == 3:
                threading.Timer(0.0, cancel.cancel).start()

    data = doc(s=("Steps", {"steps": 1000, "delay": 0.02}), out=("Sink", {"value": link("s", "value")}))
    started = time.perf_counter()
    result = executor.run(data, on_event=on_event, cancel=cancel)
    assert result.status == "cancelled"
    assert max(progress) <= 4  # the step running when cancel arrived is the last one
    assert time.perf_counter() - started < 2.0
    assert "out" not in runs


def test_cancellation_between_nodes(executor, runs):
    cancel = CancelToken()

    def on_event(event):
        if event.type == ev.NODE_FINISHED and event.node_id == "x":
            cancel.cancel()

    result = executor.run(chain_doc(), on_event=on_event, cancel=cancel)
    assert result.status == "cancelled"
    assert sum(runs.values()) == 1


def test_output_files_are_reported_again_when_cached(registry, tmp_path):
    import nodegraph_basic

    registry.add_pack("basic", nodegraph_basic.NODES)
    executor = Executor(registry, output_dir=tmp_path)
    data = doc(t=("Text", {"value": "hello"}), save=("SaveText", {"text": link("t", "value"), "filename_prefix": "greet"}))
    first = executor.run(data)
    assert first.files == [str(tmp_path / "greet_00001.txt")]
    assert (tmp_path / "greet_00001.txt").read_text() == "hello\n"
    second = executor.run(data)
    assert second.executed == []
    assert second.files == first.files
    assert len(list(tmp_path.iterdir())) == 1


def test_memory_estimate_from_a_linked_input_is_checked_before_the_node_runs(registry, tmp_path, runs):
    """Validation sees only literals; a size arriving by link is checked once known, before `run`."""
    executor = Executor(registry, OutputCache(max_bytes=10**9), device="cpu", output_dir=tmp_path, memory_budget=10**6)
    workflow = doc(n=("Count", {"value": 10**7}), b=("Blob", {"size": link("n", "value")}),
                   s=("Sink", {"value": link("b", "data")}))
    result = executor.run(workflow)
    assert result.status == "failed" and result.error.node_id == "b"
    assert type(result.error.error).__name__ == "NodeMemoryError"
    assert "Blob would need about 9.5 MiB, more than the 976.6 KiB this device holds" in str(result.error)
    assert runs == {"n": 1}  # the Blob never ran


def test_executor_budget_defaults_to_the_device_memory(registry, tmp_path):
    from nodegraph.device_memory import physical_memory_bytes

    executor = Executor(registry, device="cpu", output_dir=tmp_path)
    assert executor.memory_budget == physical_memory_bytes() > 0
