"""Small general-purpose nodes: numbers, text, arithmetic, and saving text."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

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


class FormatText(Node):
    """Fill a template like `"{a} and {b}"` with two values of any type."""

    category = "basic"

    class Inputs(NodeInputs):
        template: str = Field("{a}", description="Python format string using {a} and {b}.")
        a: ANY.annotation = Field(None, description="Value for {a}.")
        b: ANY.annotation = Field(None, description="Value for {b}.")

    class Outputs(NodeOutputs):
        text: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            text = inputs.template.format(a=inputs.a, b=inputs.b)
        except (KeyError, IndexError, ValueError) as error:
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
