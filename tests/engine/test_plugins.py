"""Pack discovery: directories and entry points, broken packs skipped, duplicates named."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

from nodegraph.executor import Executor
from nodegraph.plugins import build_registry, load_packs
from nodegraph.registry import NodeRegistry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "word_tools"
WORKFLOW = EXAMPLE / "workflow.json"


def run_example(registry, tmp_path):
    result = Executor(registry, output_dir=tmp_path / "out").run(WORKFLOW.read_text())
    assert result.status == "succeeded"
    return Path(result.files[0]).read_text()


def test_example_pack_loads_from_a_directory(tmp_path):
    packs = tmp_path / "custom_nodes"
    shutil.copytree(EXAMPLE / "nodegraph_word_tools", packs / "word_tools")
    registry, problems = build_registry([packs])
    assert problems == []
    assert registry.pack_of("SplitWords") == "word_tools"
    assert registry.types.get("WORDS").color == "#26a69a"
    assert run_example(registry, tmp_path) == "workflows, documents, nodes\n"


def test_example_pack_loads_through_an_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "nodegraph_word_tools", site / "nodegraph_word_tools")
    dist = site / "nodegraph_word_tools-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nodegraph-word-tools\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[nodegraph.nodes]\nword_tools = nodegraph_word_tools\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "nodegraph_word_tools", raising=False)
    registry, problems = build_registry([])
    assert problems == []
    assert registry.pack_of("SplitWords") == "word_tools"
    assert registry.pack_of("SaveText") == "basic"  # the built-in pack, through the same mechanism
    assert run_example(registry, tmp_path) == "workflows, documents, nodes\n"


def write_pack(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


GOOD = """
from nodegraph.node import Node, NodeInputs, NodeOutputs

class {name}(Node):
    class Outputs(NodeOutputs):
        value: int
    def run(self, inputs, ctx):
        return self.Outputs(value=1)

NODES = [{name}]
"""


def test_broken_pack_is_reported_and_the_others_load(tmp_path):
    write_pack(tmp_path, "a_broken", "import not_a_module_anywhere\n")
    write_pack(tmp_path, "b_good", GOOD.format(name="GoodNode"))
    write_pack(tmp_path, "c_no_nodes", "X = 1\n")
    registry = NodeRegistry()
    problems = load_packs(registry, [tmp_path], entry_points=False)
    assert [p.pack for p in problems] == ["a_broken", "c_no_nodes"]
    assert "ModuleNotFoundError" in problems[0].error and "not_a_module_anywhere" in problems[0].error
    assert "NODES" in problems[1].error
    assert registry.get("GoodNode") is not None


def test_two_packs_defining_one_node_type_is_an_error_naming_both(tmp_path):
    write_pack(tmp_path, "first", GOOD.format(name="Twin"))
    write_pack(tmp_path, "second", GOOD.format(name="Twin"))
    registry = NodeRegistry()
    problems = load_packs(registry, [tmp_path], entry_points=False)
    assert len(problems) == 1
    assert problems[0].pack == "second"
    assert "'Twin'" in problems[0].error and "'first'" in problems[0].error and "'second'" in problems[0].error
    assert registry.pack_of("Twin") == "first"


def test_pack_listing_a_non_node_is_rejected(tmp_path):
    write_pack(tmp_path, "odd", "NODES = [int]\n")
    problems = load_packs(NodeRegistry(), [tmp_path], entry_points=False)
    assert "not a Node subclass" in problems[0].error


def test_missing_directory_is_fine(tmp_path):
    assert load_packs(NodeRegistry(), [tmp_path / "does-not-exist"], entry_points=False) == []


def test_pack_that_exits_or_interrupts_at_import_is_skipped(tmp_path):
    write_pack(tmp_path, "a_exits", "import sys\nsys.exit(3)\n")
    write_pack(tmp_path, "b_interrupts", "raise KeyboardInterrupt\n")
    write_pack(tmp_path, "c_system_exit", "raise SystemExit('bye')\n")
    write_pack(tmp_path, "d_good", GOOD.format(name="StillHere"))
    registry = NodeRegistry()
    problems = load_packs(registry, [tmp_path], entry_points=False)
    assert {p.pack: p.error for p in problems} == {
        "a_exits": "the pack raised SystemExit(3) while importing",
        "b_interrupts": "the pack raised KeyboardInterrupt() while importing",
        "c_system_exit": "the pack raised SystemExit(bye) while importing"}
    assert registry.get("StillHere") is not None


def test_pack_that_hangs_at_import_is_skipped_after_the_time_limit(tmp_path, monkeypatch):
    import builtins
    import threading

    gate = threading.Event()  # the hanging pack waits on it until the test is over
    monkeypatch.setattr(builtins, "NODEGRAPH_TEST_GATE", gate, raising=False)
    write_pack(tmp_path, "a_hangs", "import builtins\nbuiltins.NODEGRAPH_TEST_GATE.wait()\n")
    write_pack(tmp_path, "b_good", GOOD.format(name="AfterTheHang"))
    registry = NodeRegistry()
    try:
        problems = load_packs(registry, [tmp_path], entry_points=False, timeout=5)
    finally:
        gate.set()
    assert [p.pack for p in problems] == ["a_hangs"]
    assert "did not finish within 5 s" in problems[0].error and "NODEGRAPH_PACK_IMPORT_TIMEOUT" in problems[0].error
    assert registry.get("AfterTheHang") is not None


def test_import_time_limit_comes_from_the_environment(monkeypatch):
    from nodegraph.plugins import DEFAULT_IMPORT_TIMEOUT, import_timeout

    monkeypatch.setenv("NODEGRAPH_PACK_IMPORT_TIMEOUT", "12.5")
    assert import_timeout() == 12.5
    monkeypatch.setenv("NODEGRAPH_PACK_IMPORT_TIMEOUT", "nan")
    assert import_timeout() == DEFAULT_IMPORT_TIMEOUT
