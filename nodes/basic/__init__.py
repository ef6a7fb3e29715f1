"""Small general-purpose nodes: numbers, text, arithmetic, and saving text."""

from __future__ import annotations

import math
import re
import string
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from nodegraph.files import write_numbered
from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import ANY


class Integer(Node):
    """A whole number to feed other nodes."""

    category = "basic"

    class Inputs(NodeInputs):
        value: int = Field(0, description="The number.")

    class Outputs(NodeOutputs):
        value: int

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class Number(Node):
    """A floating-point number to feed other nodes."""

    category = "basic"

    class Inputs(NodeInputs):
        value: float = Field(0.0, description="The number.")

    class Outputs(NodeOutputs):
        value: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.value)


class Text(Node):
    """A piece of text to feed other nodes."""

    category = "basic"

    class Inputs(NodeInputs):
        value: str = Field("", description="The text.", json_schema_extra={"multiline": True})

    class Outputs(NodeOutputs):
        value: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(value=inputs.value)


_OPERATIONS = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": lambda a, b: a / b,
    "power": lambda a, b: a**b,
    "min": min,
    "max": max,
}


class Math(Node):
    """Arithmetic on two numbers."""

    category = "basic"

    class Inputs(NodeInputs):
        a: float = Field(0.0, description="Left operand.")
        b: float = Field(0.0, description="Right operand.")
        operation: Literal["add", "subtract", "multiply", "divide", "power", "min", "max"] = Field(
            "add", description="What to compute.")

    class Outputs(NodeOutputs):
        result: float

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.operation == "divide" and inputs.b == 0:
            raise ZeroDivisionError("input 'b' is 0 and the operation is 'divide'")
        result = float(_OPERATIONS[inputs.operation](inputs.a, inputs.b))
        if not math.isfinite(result):
            raise OverflowError(f"{inputs.a} {inputs.operation} {inputs.b} is not a finite number")
        return self.Outputs(result=result)


MAX_FIELD_WIDTH = 10_000
"""Largest width or precision a FormatText field may ask for (`{a:>10000}`): a template cannot
make megabytes of padding out of a few characters."""


def check_template(template: str) -> str:
    """A FormatText template with fields `{a}` and `{b}` only: no attribute or index access
    (`{a.__class__}`, `{a[0]}`), no positional or nested fields, widths at most MAX_FIELD_WIDTH.
    Conversions (`!r`) and format specs (`{a:>8.3f}`) are allowed. Raises ValueError."""
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"cannot parse the template: {error}") from None
    for name, spec in fields:
        if name not in ("a", "b"):
            raise ValueError(f"field {{{name}}} is not allowed; use {{a}} or {{b}} (no attributes, indexes or "
                             "positions)")
        if "{" in spec or "}" in spec:
            raise ValueError(f"field {{{name}:{spec}}}: nested fields in a format spec are not allowed")
        widest = max((int(digits) for digits in re.findall(r"[0-9]+", spec)), default=0)
        if widest > MAX_FIELD_WIDTH:
            raise ValueError(f"field {{{name}:{spec}}}: width {widest} is over {MAX_FIELD_WIDTH}")
    return template


class FormatText(Node):
    """Fill a template like `"{a} and {b}"` with two values of any type."""

    category = "basic"

    class Inputs(NodeInputs):
        template: Annotated[str, AfterValidator(check_template)] = Field(
            "{a}", description="Format string using {a} and {b}, with optional conversions and format specs "
                               "({a!r}, {b:>8.2f}); no attribute or index access.")
        a: ANY.annotation = Field(None, description="Value for {a}.")
        b: ANY.annotation = Field(None, description="Value for {b}.")

    class Outputs(NodeOutputs):
        text: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            text = inputs.template.format(a=inputs.a, b=inputs.b)
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise ValueError(f"input 'template': cannot format {inputs.template!r}: {error}") from None
        return self.Outputs(text=text)


class SaveText(Node):
    """Write text to a new numbered file in the output folder."""

    category = "basic"
    output_node = True

    class Inputs(NodeInputs):
        text: str = Field(description="The text to save.")
        filename_prefix: str = Field("text", description="File name prefix; may include subfolders.")

    class Outputs(NodeOutputs):
        path: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        path = write_numbered(ctx.output_dir, inputs.filename_prefix, ".txt", (inputs.text + "\n").encode())
        ctx.record_file(path)
        return self.Outputs(path=str(path))


NODES: list[type[Node]] = [Integer, Number, Text, Math, FormatText, SaveText]
