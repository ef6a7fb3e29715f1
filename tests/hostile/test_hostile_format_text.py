"""FormatText cannot reach attributes of its arguments nor pad text without bound: such templates
are refused at validation, or (arriving by link) before the node formats anything."""

from __future__ import annotations

import pytest

from hostile_fixtures import fuzz_registry
from counting_pack import doc, link
from nodegraph.executor import Executor
from nodegraph.validation import WorkflowInvalid

HOSTILE = ["{a.__class__}", "{a.__init__.__globals__[sys]}", "{b.__class__.__mro__}", "{a[0]}", "{0}", "{}",
           "{a:{b}}", "{a:>100000}", "{a:.99999f}", "{c}", "{a"]


def format_workflow(template) -> dict:
    return doc(f=("FormatText", {"template": template, "a": "text", "b": 1.5}), s=("SaveText", {"text": link("f", "text")}))


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_are_refused_at_validation(tmp_path, template):
    executor = Executor(fuzz_registry(), device="cpu", output_dir=tmp_path)
    with pytest.raises(WorkflowInvalid) as caught:
        executor.compile(format_workflow(template))
    [issue] = caught.value.issues
    assert (issue.code, issue.node_id, issue.input) == ("invalid_value", "f", "template")


def test_a_hostile_template_arriving_by_link_fails_the_node_before_formatting(tmp_path):
    executor = Executor(fuzz_registry(), device="cpu", output_dir=tmp_path)
    result = executor.run(doc(t=("Text", {"value": "{a.__init__.__globals__}"}),
                              f=("FormatText", {"template": link("t", "value"), "a": "text"}),
                              s=("SaveText", {"text": link("f", "text")})))
    assert result.status == "failed" and result.error.node_id == "f"
    assert "field {a.__init__.__globals__} is not allowed" in str(result.error)
    assert "__builtins__" not in str(result.error)


def test_allowed_templates_still_format(tmp_path):
    executor = Executor(fuzz_registry(), device="cpu", output_dir=tmp_path)
    result = executor.run(format_workflow("{a!r:>8} and {b:08.3f}; {{literal}}"))
    assert result.status == "succeeded"
    assert (tmp_path / "text_00001.txt").read_text() == "  'text' and 0001.500; {literal}\n"
