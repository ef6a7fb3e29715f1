"""The ComfyUI corpus: real workflows written by other people (tests/data/comfyui_corpus; the origin,
licence, form and model family of each file in its manifest.json, the sources in SOURCES.md), each
imported and validated the way `nodegraph validate` does it, with the model and input files they
name set aside (they are the user's, and not on this machine). Which files validate is pinned in the
manifest: a file that stops validating fails, and so does one that starts to without being recorded.

Run as a script for the gap table (per family and form, the node types and values that block most);
with --update it also rewrites the manifest's `validates` and `blocking` fields from what validates now:

    .venv/bin/python tests/diffusion/test_comfyui_corpus.py [--update]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodegraph.cli import read_workflow
from nodegraph.executor import Executor
from nodegraph.importers import UNSUPPORTED_NODE_TYPES
from nodegraph.plugins import build_registry
from nodegraph.registry import NodeRegistry
from nodegraph.validation import ValidationIssue, WorkflowInvalid
from nodegraph.workflow import Workflow
from nodegraph_diffusion.nodes import folders

CORPUS = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
MANIFEST_PATH = CORPUS / "manifest.json"
MANIFEST: list[dict[str, Any]] = json.loads(MANIFEST_PATH.read_text())

FORMS = ("api", "ui", "png-api", "png-ui")
FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "other")
LICENCES = frozenset({"0BSD", "MIT", "GPL-3.0", "AGPL-3.0"})
MIN_WORKFLOWS = 60
MAX_CORPUS_BYTES = 5_000_000
# Validation names a missing file as a value outside an input's choices of files of one kind.
FILE_KINDS = frozenset(folders.MODEL_KINDS) | {"inputs"}


@dataclass(frozen=True)
class Outcome:
    """What validating one corpus file found: the issues that stop it, and the model and input files
    it names that are not here (set aside: a user running it has them)."""

    blocking: tuple[ValidationIssue, ...]
    absent_files: tuple[str, ...]

    @property
    def validates(self) -> bool:
        return not self.blocking


def absent_file(issue: ValidationIssue, workflow: Workflow | None, registry: NodeRegistry) -> str | None:
    """`kind/name` when the issue says no more than that a model or input file is not here."""
    if issue.code != "value_not_in_choices" or workflow is None or issue.node_id not in workflow.nodes:
        return None
    node_class = registry.get(workflow.nodes[issue.node_id].type)
    spec = node_class.specs().inputs.get(issue.input or "") if node_class is not None else None
    kind = spec.dynamic_choices.kind if spec is not None and spec.dynamic_choices is not None else None
    return f"{kind}/{issue.details.get('value')}" if kind in FILE_KINDS else None


def validate(path: Path, registry: NodeRegistry, executor: Executor) -> Outcome:
    """Import (when foreign) and validate one file as `nodegraph validate` does."""
    workflow = None
    issues: list[ValidationIssue] = []
    try:
        workflow = read_workflow(str(path), [], registry)
        executor.compile(workflow)
    except WorkflowInvalid as invalid:
        issues = invalid.issues
    absent = [absent_file(issue, workflow, registry) for issue in issues]
    return Outcome(tuple(issue for issue, name in zip(issues, absent) if name is None),
                   tuple(name for name in absent if name is not None))


@contextmanager
def without_user_files() -> Iterator[None]:
    """Empty model and inputs folders whatever this machine holds, so that every run of the corpus
    meets the same absent files."""
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as empty:
        for name in (folders.MODELS_ENV, folders.CONFIG_ENV, folders.INPUTS_ENV):
            patch.delenv(name, raising=False)
        patch.setenv("XDG_CONFIG_HOME", empty)
        patch.chdir(empty)
        yield


def validate_corpus() -> dict[str, Outcome]:
    registry, problems = build_registry()
    assert not problems, problems
    executor = Executor(registry, device="cpu")
    with without_user_files():
        return {entry["file"]: validate(CORPUS / entry["file"], registry, executor) for entry in MANIFEST}


def reasons(outcome: Outcome) -> list[str]:
    """One line per blocking issue, as recorded in the manifest's `blocking`."""
    lines = []
    for issue in outcome.blocking:
        if issue.code == UNSUPPORTED_NODE_TYPES:
            line = f"{issue.code}: {', '.join(issue.details['types'])}"
        else:
            line = f"{issue.code}: {issue}"
        if line not in lines:
            lines.append(line)
    return lines


def _unsupported_types(outcome: Outcome) -> list[str]:
    """The node types that block a file, with subgraphs and group nodes counted as one kind each."""
    found = []
    for issue in outcome.blocking:
        if issue.code == UNSUPPORTED_NODE_TYPES:
            for name in issue.details["types"]:
                if name.startswith("subgraph "):
                    name = "(any subgraph)"
                elif name.startswith(("workflow/", "workflow>")):
                    name = "(any group node)"
                if name not in found:
                    found.append(name)
    return found


def _value_blocker(issue: ValidationIssue) -> str:
    # Drop the list of supported values: the blocker is the value the file holds.
    return f"{issue.code}: {issue.message.split(' (supported:')[0]}"


def gap_table(manifest: list[dict[str, Any]], outcomes: dict[str, Outcome], top: int = 40) -> str:
    """Markdown tables of what validates, by model family and form, and of what blocks the rest."""
    header = ["| {} | files | validate | core-only files | core-only validate |", "| --- | ---: | ---: | ---: | ---: |"]
    lines = [header[0].format("family"), header[1]]

    def row(label: str, entries: list[dict[str, Any]]) -> str:
        core = [e for e in entries if not e["custom_nodes"]]
        ok = [e for e in entries if outcomes[e["file"]].validates]
        return (f"| {label} | {len(entries)} | {len(ok)} | {len(core)} | "
                f"{sum(outcomes[e['file']].validates for e in core)} |")

    lines += [row(family, [e for e in manifest if e["family"] == family]) for family in FAMILIES]
    lines.append(row("all", manifest))
    lines += ["", header[0].format("form"), header[1]]
    lines += [row(form, [e for e in manifest if e["form"] == form]) for form in FORMS]

    blocked_by: dict[str, Counter[str]] = {"core": Counter(), "custom": Counter()}
    only_blocker: Counter[str] = Counter()
    families_of: dict[str, set[str]] = {}
    other: Counter[str] = Counter()
    for entry in manifest:
        outcome = outcomes[entry["file"]]
        types = _unsupported_types(outcome)
        for name in types:
            blocked_by["custom" if name in entry["custom_node_types"] else "core"][name] += 1
            families_of.setdefault(name, set()).add(entry["family"])
        if len(types) == 1 and len(outcome.blocking) == 1:
            only_blocker[types[0]] += 1
        other.update({_value_blocker(i) for i in outcome.blocking if i.code != UNSUPPORTED_NODE_TYPES})
    for group in ("core", "custom"):
        lines += ["", f"| {group} node type | files blocked | only blocker in | families |",
                  "| --- | ---: | ---: | --- |"]
        lines += [f"| {name} | {count} | {only_blocker[name]} | {', '.join(sorted(families_of[name]))} |"
                  for name, count in blocked_by[group].most_common(top)]
    lines += ["", "| other blocking issue | files |", "| --- | ---: |"]
    lines += [f"| {text} | {count} |" for text, count in other.most_common(top)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    found = validate_corpus()
    print(gap_table(MANIFEST, found))  # shown with -s: what blocks the corpus today
    return found


def test_manifest_records_the_origin_of_every_corpus_file():
    on_disk = {path.name for path in CORPUS.glob("*.json")} - {MANIFEST_PATH.name}
    listed = [entry["file"] for entry in MANIFEST]
    assert sorted(listed) == sorted(on_disk) and len(set(listed)) == len(listed)
    assert len(listed) >= MIN_WORKFLOWS
    for entry in MANIFEST:
        assert entry["repository"].count("/") == 1 and entry["path"], entry["file"]
        assert len(entry.get("commit", "")) == 40 or entry.get("version"), entry["file"]
        assert entry["licence"] in LICENCES, entry["file"]
        assert entry["form"] in FORMS and entry["family"] in FAMILIES, entry["file"]
        assert entry["custom_nodes"] == bool(entry["custom_node_types"]), entry["file"]
        assert entry["validates"] == (not entry["blocking"]), entry["file"]
        assert entry["file"].startswith(f"{entry['source']}__"), entry["file"]
        json.loads((CORPUS / entry["file"]).read_text(encoding="utf-8"))
    assert {entry["form"] for entry in MANIFEST} == set(FORMS)
    assert {entry["family"] for entry in MANIFEST} == set(FAMILIES)
    assert sum((CORPUS / name).stat().st_size for name in on_disk) < MAX_CORPUS_BYTES


def test_sources_list_every_repository_of_the_manifest():
    sources = (CORPUS / "SOURCES.md").read_text()
    for repository in {entry["repository"] for entry in MANIFEST}:
        assert repository in sources


@pytest.mark.parametrize("entry", MANIFEST, ids=[entry["file"] for entry in MANIFEST])
def test_corpus_file_validates_as_recorded(entry, outcomes):
    outcome = outcomes[entry["file"]]
    if entry["validates"]:
        assert outcome.validates, "no longer validates:\n" + "\n".join(reasons(outcome))
    else:
        assert not outcome.validates, ("validates now: record it in manifest.json "
                                       "(python tests/diffusion/test_comfyui_corpus.py --update)")


def _core_only(families: tuple[str, ...]) -> list[dict[str, Any]]:
    return [entry for entry in MANIFEST if entry["family"] in families and not entry["custom_nodes"]]


# Core node types that cannot be built here, each with why: a file blocked by these alone is
# listed apart by the tests below, which check that nothing else blocks any core-only file.
BLOCKED_HERE = {
    # Upscale models are meant to load through spandrel (as ComfyUI does), which imports torchvision;
    # PyPI's torchvision for torch 2.13 is built against CUDA torch and fails to import beside the
    # CPU build ("operator torchvision::nms does not exist").
    "UpscaleModelLoader": "spandrel needs torchvision", "ImageUpscaleWithModel": "spandrel needs torchvision",
    # A constant prompt embedding of the Lotus depth model's frozen text encoder, which only that
    # model's weights could reproduce; the Lotus U-Net is a depth estimator, not an SD3/Flux node.
    "LotusConditioning": "Lotus's precomputed text embedding",
}


def _blocked_only_here(outcome: Outcome) -> bool:
    return (all(issue.code == UNSUPPORTED_NODE_TYPES for issue in outcome.blocking)
            and set(_unsupported_types(outcome)) <= set(BLOCKED_HERE))


@pytest.mark.parametrize("families", [("sd1", "sd2", "sdxl"), ("sd3", "flux")], ids=["sd1-sd2-sdxl", "sd3-flux"])
def test_core_only_workflows_validate_but_for_the_nodes_blocked_here(outcomes, families):
    failing = {e["file"]: reasons(outcomes[e["file"]]) for e in _core_only(families)
               if not outcomes[e["file"]].validates and not _blocked_only_here(outcomes[e["file"]])}
    assert not failing


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue 15: ComfyUI's upscale-model nodes (BLOCKED_HERE) still missing")
def test_every_core_only_sd1_sd2_sdxl_workflow_validates(outcomes):
    failing = {e["file"]: reasons(outcomes[e["file"]]) for e in _core_only(("sd1", "sd2", "sdxl"))
               if not outcomes[e["file"]].validates}
    assert not failing


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue 14: LotusConditioning (BLOCKED_HERE) still missing")
def test_every_core_only_sd3_flux_workflow_validates(outcomes):
    failing = {e["file"]: reasons(outcomes[e["file"]]) for e in _core_only(("sd3", "flux"))
               if not outcomes[e["file"]].validates}
    assert not failing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite manifest.json's validates/blocking")
    args = parser.parse_args()
    found = validate_corpus()
    if args.update:
        for entry in MANIFEST:
            entry["validates"] = found[entry["file"]].validates
            entry["blocking"] = reasons(found[entry["file"]])
        MANIFEST_PATH.write_text(json.dumps(MANIFEST, indent=1, ensure_ascii=False) + "\n")
    print(gap_table(MANIFEST, found))


if __name__ == "__main__":
    main()
