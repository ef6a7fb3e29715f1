"""The command line, as a user runs it: exit codes, overrides, JSON output, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from counting_pack import doc, link

ROOT = Path(__file__).resolve().parents[2]
PACK = Path(__file__).with_name("counting_pack.py")


def nodegraph(*args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodegraph", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "custom_nodes").mkdir()
    shutil.copy(PACK, tmp_path / "custom_nodes" / "counting_pack.py")
    return tmp_path


def write(path: Path, data) -> str:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_run_arithmetic_example_and_override(workdir):
    done = nodegraph("run", str(ROOT / "workflows" / "arithmetic.json"), "--output-dir", "out", cwd=workdir)
    assert done.returncode == 0, done.stderr
    out_file = Path(done.stdout.split()[0])
    assert (workdir / out_file).read_text() == "(3 + 4.5) * 2 = 15.0\n"
    done = nodegraph("run", str(ROOT / "workflows" / "arithmetic.json"), "--output-dir", "out",
                     "--set", "b.value=5.5", "--set", "text.template=result {a}", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert (workdir / done.stdout.split()[0]).read_text() == "result 17.0\n"


def test_invalid_workflow_exits_2_with_every_issue(workdir):
    path = write(workdir / "bad.json", doc(v=("Value", {"value": 5000}), s=("Sink", {"value": link("w", "value")})))
    done = nodegraph("run", path, cwd=workdir)
    assert done.returncode == 2
    assert "v.value" in done.stderr and "value_out_of_bounds" in done.stderr
    assert "s.value" in done.stderr and "missing_node" in done.stderr
    done = nodegraph("validate", path, "--json", cwd=workdir)
    assert done.returncode == 2
    assert {i["code"] for i in json.loads(done.stdout)["issues"]} == {"value_out_of_bounds", "missing_node"}


def test_malformed_json_and_missing_file_exit_2(workdir):
    done = nodegraph("run", write(workdir / "broken.json", '{"nodes": {'), cwd=workdir)
    assert done.returncode == 2
    assert "line 1, column 12" in done.stderr
    done = nodegraph("run", str(workdir / "nope.json"), cwd=workdir)
    assert done.returncode == 2
    assert "nope.json" in done.stderr


def test_bad_set_argument_exits_2(workdir):
    path = write(workdir / "w.json", doc(v=("Value", {}), s=("Sink", {"value": link("v", "value")})))
    done = nodegraph("run", path, "--set", "ghost.value=1", cwd=workdir)
    assert done.returncode == 2 and "ghost" in done.stderr
    done = nodegraph("run", path, "--set", "novalue", cwd=workdir)
    assert done.returncode == 2 and "NODE.INPUT=VALUE" in done.stderr


def test_node_failure_exits_1_naming_the_node(workdir):
    path = write(workdir / "fail.json", doc(f=("Fail", {}), s=("Sink", {"value": link("f", "value")})))
    done = nodegraph("run", path, cwd=workdir)
    assert done.returncode == 1
    assert "node 'f' (Fail) failed: RuntimeError: boom" in done.stderr


def test_json_output_is_one_event_per_line(workdir):
    path = write(workdir / "w.json", doc(s=("Steps", {"steps": 2}), o=("Sink", {"value": link("s", "value")})))
    done = nodegraph("run", path, "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line.get("type") for line in lines[:-1]] == [
        "run_started", "node_started", "node_progress", "node_progress", "node_finished",
        "node_started", "node_finished", "run_finished"]
    assert lines[-1]["result"]["status"] == "succeeded"


def test_ctrl_c_cancels_cleanly_with_exit_130(workdir):
    path = write(workdir / "long.json", doc(s=("Steps", {"steps": 10_000, "delay": 0.01}),
                                            o=("Sink", {"value": link("s", "value")})))
    process = subprocess.Popen([sys.executable, "-m", "nodegraph", "run", path, "--json"], cwd=workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if json.loads(line).get("type") == "node_progress":
            break
    started = time.perf_counter()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert time.perf_counter() - started < 5
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[-2]["type"] == "run_cancelled"
    assert events[-1]["result"]["status"] == "cancelled"


def test_nodes_json_lists_inputs_and_outputs(workdir):
    done = nodegraph("nodes", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    catalogue = json.loads(done.stdout)
    choose = catalogue["nodes"]["Choose"]
    assert choose["inputs"]["mode"]["choices"] == ["fast", "slow"]
    assert choose["inputs"]["count"] == {"type": "INT", "required": False, "description": "", "link_only": False,
                                         "default": 1, "ge": 1, "le": 10, "multiple_of": 1}
    assert catalogue["nodes"]["SaveText"]["output_node"] is True
    assert catalogue["nodes"]["Math"]["pack"] == "basic"
    text = nodegraph("nodes", cwd=workdir).stdout
    assert "Math - Arithmetic on two numbers." in text


NAMING_PACK = """
class OtherToolNames:
    name = "othertool"

    def detect(self, document):
        return False

    def convert(self, document):
        raise ValueError("never detects")

    def aliases(self):
        return {"Sink": ["ShowAnything", "Sink"], "Value": ["PrimitiveNumber"]}


NODES = []
IMPORTERS = [OtherToolNames()]
"""


def test_nodes_query_finds_node_types_by_any_of_their_names(workdir):
    (workdir / "custom_nodes" / "naming_pack.py").write_text(NAMING_PACK)
    done = nodegraph("nodes", "showanything", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "  Sink - " in done.stdout
    assert "also known as: ShowAnything\n" in done.stdout  # its own name is not repeated
    assert "  Value - " not in done.stdout and "  Math - " not in done.stdout
    listed = json.loads(nodegraph("nodes", "NUMBER", "--json", cwd=workdir).stdout)["nodes"]
    assert listed["Value"]["aliases"] == ["PrimitiveNumber"]
    assert "Sink" not in listed
    assert "Math" in json.loads(nodegraph("nodes", "math", "--json", cwd=workdir).stdout)["nodes"]
    missing = nodegraph("nodes", "NoSuchNode", cwd=workdir)
    assert missing.returncode == 2
    assert "'NoSuchNode'" in missing.stderr and missing.stdout == ""


def test_schema_command_prints_json_schema(workdir):
    done = nodegraph("schema", cwd=workdir)
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    assert "node_Math" in schema["$defs"]


def run_in_process(workdir: Path, *args: str) -> int:
    """`nodegraph ARGS` in this process (no interpreter start per case), with the counting pack."""
    from nodegraph.cli import main

    return main([*args, "--nodes-dir", str(workdir / "custom_nodes")])


def test_run_and_validate_honour_bypass_and_mute(workdir, capsys):
    """The arithmetic example with its doubling bypassed runs the sum straight into the text; with
    the sum muted, validation names it at the node it no longer feeds."""
    document = json.loads((ROOT / "workflows" / "arithmetic.json").read_text())
    document["nodes"]["scaled"]["mode"] = "bypass"
    path = write(workdir / "bypassed.json", document)
    assert run_in_process(workdir, "run", path, "--output-dir", str(workdir / "out")) == 0
    written = capsys.readouterr().out.split()[0]
    assert Path(written).read_text() == "(3 + 4.5) * 2 = 7.5\n"
    document["nodes"]["sum"]["mode"] = "mute"
    path = write(workdir / "muted.json", document)
    assert run_in_process(workdir, "validate", path, "--json") == 2
    [issue] = json.loads(capsys.readouterr().out)["issues"]
    assert (issue["code"], issue["node_id"], issue["details"]["muted"]) == ("muted_source", "text", "sum")


@pytest.mark.parametrize("value, message", [
    ("9" * 5000, "--set v.value: a number is too long"),
    ("[" * 5000, "--set v.value: nested too deeply"),
    ("[" * 500 + "]" * 500, "nested more than 64 levels deep [too_deep]"),  # decodes; validation refuses it
    ("NaN", "--set v.value: NaN is not a JSON number"),
    ("1e999", "out of range; numbers must be finite"),
])
def test_hostile_set_values_exit_2_with_a_message(workdir, capsys, value, message):
    path = write(workdir / "w.json", doc(v=("Value", {}), s=("Sink", {"value": link("v", "value")})))
    assert run_in_process(workdir, "run", path, "--set", f"v.value={value}", "--output-dir", str(workdir / "out")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"version": 1, "nodes": {}, "ui": {"a": ' + "[" * 900 + "]" * 900 + "}}", "ui/a/0/0"),
    ('{"version": 1, "nodes": {"v": {"type": "Value", "inputs": {"value": Infinity}}}}', "Infinity is not a JSON number"),
])
def test_hostile_workflow_files_exit_2_with_a_message(workdir, capsys, text, message):
    path = write(workdir / "hostile.json", text)
    for command in ("run", "validate"):
        assert run_in_process(workdir, command, path) == 2
        captured = capsys.readouterr()
        assert message in captured.out + captured.err and "Traceback" not in captured.err


THREADS_PACK = '''
import os
from pathlib import Path
from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext


class ThreadsSeen(Node):
    """Writes the thread and compile settings the packs see to threads.txt and compile.txt."""

    output_node = True

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: NodeInputs, ctx: RunContext) -> Outputs:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        (ctx.output_dir / "threads.txt").write_text(os.environ.get("NODEGRAPH_THREADS", "unset"))
        (ctx.output_dir / "compile.txt").write_text(os.environ.get("NODEGRAPH_COMPILE", "unset"))
        return self.Outputs()


NODES = [ThreadsSeen]
'''


@pytest.mark.parametrize(("given", "environment", "seen"), [
    (["--threads", "3"], None, "3"), (["--threads", "auto"], "2", "auto"), ([], "2", "2"), ([], None, "unset")])
def test_threads_option_reaches_the_packs(workdir, given, environment, seen):
    (workdir / "custom_nodes" / "threads_pack.py").write_text(THREADS_PACK)
    workflow = write(workdir / "wf.json", {"version": 1, "nodes": {"t": {"type": "ThreadsSeen", "inputs": {}}}})
    env = {k: v for k, v in os.environ.items() if k != "NODEGRAPH_THREADS"}
    if environment is not None:
        env["NODEGRAPH_THREADS"] = environment
    done = nodegraph("run", workflow, "--output-dir", "out", *given, cwd=workdir, env=env)
    assert done.returncode == 0, done.stderr
    assert (workdir / "out" / "threads.txt").read_text() == seen


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_bad_threads_option_exits_2_naming_it(workdir, value):
    workflow = write(workdir / "wf.json", doc(a=("Value", {"value": 1})))
    for command in (["run", workflow], ["serve"]):
        done = nodegraph(*command, f"--threads={value}", cwd=workdir)
        assert done.returncode == 2
        assert "--threads" in done.stderr and "expected a number of threads" in done.stderr


@pytest.mark.parametrize(("given", "seen"), [(["--compile"], "default"), (["--compile-mode", "reduce-overhead"], "reduce-overhead"),
                                             ([], "unset")])
def test_compile_option_reaches_the_packs(workdir, given, seen):
    (workdir / "custom_nodes" / "threads_pack.py").write_text(THREADS_PACK)
    workflow = write(workdir / "wf.json", {"version": 1, "nodes": {"t": {"type": "ThreadsSeen", "inputs": {}}}})
    env = {k: v for k, v in os.environ.items() if k != "NODEGRAPH_COMPILE"}
    done = nodegraph("run", workflow, *given, "--output-dir", "out", cwd=workdir, env=env)
    assert done.returncode == 0, done.stderr
    assert (workdir / "out" / "compile.txt").read_text() == seen
