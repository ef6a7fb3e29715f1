"""Importers of foreign workflow formats: the pack hook, format detection in the registry, and the
CLI's run/validate/convert on a foreign file, with a toy format."""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodegraph.cli import main
from nodegraph.executor import Executor
from nodegraph.importers import UNSUPPORTED_NODE_TYPES, WorkflowImportError, import_document
from nodegraph.plugins import build_registry
from nodegraph.registry import NodeRegistry
from nodegraph.validation import WorkflowInvalid

import counting_pack

PACK = Path(__file__).with_name("counting_pack.py")

# A pack with no nodes and one importer: {"toy": [[id, kind, argument], ...]} where kind "number"
# is a Value node and "show" a Sink fed by the node named by its argument.
TOY_PACK = textwrap.dedent('''
    from nodegraph.importers import WorkflowImportError
    from nodegraph.validation import ValidationIssue

    class ToyImporter:
        name = "toy format"

        def detect(self, document):
            return isinstance(document, dict) and isinstance(document.get("toy"), list)

        def convert(self, document):
            nodes, unsupported, issues = {}, {}, []
            ids = {row[0] for row in document["toy"]}
            for node_id, kind, argument in document["toy"]:
                if kind == "number":
                    nodes[node_id] = {"type": "Value", "inputs": {"value": argument}}
                elif kind == "show":
                    if argument not in ids:
                        issues.append(ValidationIssue("cannot_import", f"shows missing node {argument!r}",
                                                      node_id, "argument"))
                    nodes[node_id] = {"type": "Sink", "inputs": {"value": {"from": argument, "output": "value"}}}
                else:
                    unsupported.setdefault(kind, []).append(node_id)
            if unsupported or issues:
                raise WorkflowImportError(self.name, unsupported, issues)
            return {"version": 1, "nodes": nodes}

    NODES = []
    IMPORTERS = [ToyImporter()]
''')

TOY = {"toy": [["a", "number", 2.5], ["out", "show", "a"]]}
TOY_UNSUPPORTED = {"toy": [["a", "number", 1], ["b", "square", "a"], ["c", "cube", "a"], ["d", "square", "a"],
                           ["out", "show", "zz"]]}


@pytest.fixture
def workdir(tmp_path) -> Path:
    packs = tmp_path / "custom_nodes"
    packs.mkdir()
    shutil.copy(PACK, packs / "counting_pack.py")
    (packs / "toy_format.py").write_text(TOY_PACK)
    return tmp_path


@pytest.fixture
def registry(workdir) -> NodeRegistry:
    registry, problems = build_registry([workdir / "custom_nodes"], entry_points=False)
    assert problems == []
    return registry


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def nodegraph(workdir, capsys):
    """The command line, in this process (a subprocess would import every pack again each call)."""

    def call(*args: str) -> Done:
        capsys.readouterr()
        code = main([args[0], "--nodes-dir", str(workdir / "custom_nodes"), *args[1:]])
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return call


def write(path: Path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_pack_importers_are_registered_and_used_by_format(registry):
    assert [importer.name for importer in registry.importers] == ["toy format"]
    converted, used = registry.import_document(TOY)
    assert used == "toy format"
    assert converted["nodes"]["out"] == {"type": "Sink", "inputs": {"value": {"from": "a", "output": "value"}}}
    result = Executor(registry, device="cpu").run(converted)
    assert result.status == "succeeded"
    assert sorted(result.executed) == ["a", "out"]


def test_native_and_unrecognised_documents_pass_through_unconverted(registry):
    native = counting_pack.doc(toy=("Value", {}))  # a node named like the toy format's key changes nothing
    assert registry.import_document(native) == (native, None)
    assert registry.import_document({"something": "else"}) == ({"something": "else"}, None)
    assert import_document([], TOY) == (TOY, None)


def test_unsupported_types_are_listed_by_name_all_at_once(registry):
    with pytest.raises(WorkflowImportError) as caught:
        registry.import_document(TOY_UNSUPPORTED)
    error = caught.value
    assert isinstance(error, WorkflowInvalid)
    assert error.unsupported_types == {"cube": ["c"], "square": ["b", "d"]}
    first, second = error.issues
    assert first.code == UNSUPPORTED_NODE_TYPES
    assert "cube (node c)" in first.message and "square (nodes b, d)" in first.message
    # The nodes are named in the details too (a client marks each); no one node is the issue's.
    assert first.details["node_ids"] == ["c", "b", "d"] and first.node_id is None
    assert (second.node_id, second.input, second.code) == ("out", "argument", "cannot_import")


def test_a_single_unsupported_node_is_the_issues_node():
    (issue,) = WorkflowImportError("toy format", {"cube": ["c"]}).issues
    assert (issue.code, issue.node_id, issue.details["node_ids"]) == (UNSUPPORTED_NODE_TYPES, "c", ["c"])
    assert issue.to_json()["node_id"] == "c"


def test_a_pack_with_a_broken_importer_is_skipped_with_the_reason(tmp_path):
    packs = tmp_path / "custom_nodes"
    packs.mkdir()
    (packs / "broken.py").write_text("class Half:\n    name = 'half'\n    def detect(self, d):\n        return True\n\n"
                                     "NODES = []\nIMPORTERS = [Half()]\n")
    registry, problems = build_registry([packs], entry_points=False)
    assert [problem.pack for problem in problems] == ["broken"]
    assert "importer 'half' has no `convert(document)` method" in problems[0].error
    assert registry.importers == []


def test_two_importers_with_one_name_are_refused(registry):
    importer = registry.importers[0]
    with pytest.raises(ValueError, match="importer named 'toy format' is already registered"):
        registry.add_pack("again", [], importers=[importer])
    assert len(registry.importers) == 1


def test_cli_runs_and_validates_a_foreign_file(workdir, nodegraph):
    path = write(workdir / "toy.json", TOY)
    done = nodegraph("run", path, "--json", "--set", "a.value=4")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])["result"]
    assert result["status"] == "succeeded" and sorted(result["executed"]) == ["a", "out"]
    done = nodegraph("validate", path)
    assert done.returncode == 0, done.stdout + done.stderr
    out_of_range = {"toy": [["a", "number", 5000], ["o", "show", "a"]]}
    done = nodegraph("validate", write(workdir / "range.json", out_of_range), "--json")
    assert done.returncode == 2
    assert [i["code"] for i in json.loads(done.stdout)["issues"]] == ["value_out_of_bounds"]


def test_cli_run_and_convert_exit_2_naming_unsupported_types(workdir, nodegraph):
    path = write(workdir / "bad.json", TOY_UNSUPPORTED)
    for command in (["run", path], ["convert", path, str(workdir / "out.json")]):
        done = nodegraph(*command)
        assert done.returncode == 2, command
        assert "cube (node c)" in done.stderr and "square (nodes b, d)" in done.stderr
        assert "out.argument" in done.stderr
    assert not (workdir / "out.json").exists()
    done = nodegraph("validate", path, "--json")
    assert done.returncode == 2
    issues = json.loads(done.stdout)["issues"]
    assert issues[0]["details"]["types"] == {"cube": ["c"], "square": ["b", "d"]}


def test_cli_convert_writes_the_nodegraph_form(workdir, nodegraph):
    out = workdir / "converted" / "toy.json"
    done = nodegraph("convert", write(workdir / "toy.json", TOY), str(out))
    assert done.returncode == 0, done.stderr
    assert "toy format" in done.stdout and str(out) in done.stdout
    written = json.loads(out.read_text())
    assert written["version"] == 1
    assert written["nodes"]["a"] == {"type": "Value", "inputs": {"value": 2.5}}
    done = nodegraph("run", str(out), "--json")
    assert done.returncode == 0, done.stderr


def test_cli_convert_refuses_native_unknown_and_broken_files(workdir, nodegraph):
    out = str(workdir / "out.json")
    native = nodegraph("convert", write(workdir / "native.json", counting_pack.doc(v=("Value", {}))), out)
    assert native.returncode == 2 and "already a nodegraph workflow" in native.stderr
    unknown = nodegraph("convert", write(workdir / "unknown.json", {"graph": []}), out)
    assert unknown.returncode == 2 and "no importer recognises it" in unknown.stderr
    assert "toy format" in unknown.stderr
    (workdir / "broken.json").write_text('{"toy": [')
    broken = nodegraph("convert", str(workdir / "broken.json"), out)
    assert broken.returncode == 2 and "line 1, column 10" in broken.stderr
    assert not Path(out).exists()
