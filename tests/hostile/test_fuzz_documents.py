"""Property-based fuzzing of the workflow document and of `--set` values: whatever comes in is
either refused with validation issues (exit 2 on the command line) or runs to an outcome, and what
is accepted is standard JSON that can be stored and sent back. Never an exception from the engine."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_fixtures import fuzz_registry
from counting_pack import doc, link
from hostile_strategies import any_values, documents, json_values, texts
from nodegraph.cache import OutputCache
from nodegraph.executor import Executor
from nodegraph.validation import WorkflowInvalid

# The default run fuzzes briefly (two shared cores); the `slow` cases search much longer.
BUDGETS = [pytest.param(dict(max_examples=60, derandomize=True), id="brief"),
           pytest.param(dict(max_examples=1500), id="long", marks=pytest.mark.slow)]


def fuzz_settings(budget: dict) -> settings:
    return settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), **budget)


def standard_json(value: object) -> str:
    """JSON text any client reads: no NaN or Infinity, encodable as UTF-8."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    return text


@pytest.mark.parametrize("budget", BUDGETS)
def test_documents_are_refused_cleanly_or_run_to_an_outcome(budget, tmp_path):
    registry = fuzz_registry()
    executor = Executor(registry, OutputCache(max_bytes=10**7), device="cpu", output_dir=tmp_path / "out")
    seen = {"refused": 0, "ran": 0}

    @fuzz_settings(budget)
    @given(document=documents(registry))
    def check(document):
        try:
            plan = executor.compile(document)
        except WorkflowInvalid as invalid:
            assert invalid.issues
            standard_json([issue.to_json() for issue in invalid.issues])  # what the API answers
            seen["refused"] += 1
            return
        standard_json(document)  # what the run store keeps and GET /api/runs/{id} sends back
        standard_json(plan.workflow.to_json())
        result = executor.run(plan)
        assert result.status in ("succeeded", "failed")
        if result.error is not None:
            standard_json(result.error.to_json())
        seen["ran"] += 1

    check()
    assert seen["refused"] > 0 and seen["ran"] > 0, seen  # the fuzz reached both sides


@pytest.mark.parametrize("budget", BUDGETS)
def test_set_values_exit_0_1_or_2_never_a_traceback(budget, tmp_path):
    from nodegraph.cli import main

    (tmp_path / "packs").mkdir()
    path = tmp_path / "w.json"
    path.write_text(json.dumps(doc(v=("Text", {"value": "x"}), f=("FormatText", {"a": link("v", "value")}),
                                   s=("SaveText", {"text": link("f", "text")}))))
    codes = set()

    @fuzz_settings(budget)
    @given(target=st.sampled_from(["v.value", "f.template", "f.a", "s.filename_prefix", "ghost.x", "v.nope"]),
           value=texts | json_values.map(json.dumps) | any_values.map(json.dumps))
    def check(target, value):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", str(path), "--set", f"{target}={value}", "--output-dir", str(tmp_path / "out"),
                         "--nodes-dir", str(tmp_path / "packs")])
        assert code in (0, 1, 2), err.getvalue()
        assert "Traceback" not in err.getvalue()
        if code == 2:
            assert err.getvalue().strip()  # a message saying what is wrong
        codes.add(code)

    check()
    assert {0, 2} <= codes, codes
