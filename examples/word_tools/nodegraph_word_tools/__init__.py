"""Example node pack: a new socket type (WORDS) and three nodes that use it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import SocketType

WORDS = SocketType("WORDS", "A list of words.", color="#26a69a")


class SplitWords(Node):
    """Split text into words at whitespace."""

    category = "text/words"

    class Inputs(NodeInputs):
        text: str = Field(description="The text to split.", json_schema_extra={"multiline": True})
        case: Literal["keep", "lower", "upper"] = Field("keep", description="Change the letter case first.")

    class Outputs(NodeOutputs):
        words: WORDS.annotation
        count: int

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        text = {"keep": inputs.text, "lower": inputs.text.lower(), "upper": inputs.text.upper()}[inputs.case]
        words = text.split()
        return self.Outputs(words=words, count=len(words))


class LongestWords(Node):
    """Keep the `n` longest words, longest first."""

    category = "text/words"

    class Inputs(NodeInputs):
        words: WORDS.annotation = Field(description="Words to choose from.")
        n: int = Field(3, ge=1, le=1000, description="How many to keep.")

    class Outputs(NodeOutputs):
        words: WORDS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(words=sorted(inputs.words, key=len, reverse=True)[: inputs.n])


class JoinWords(Node):
    """Join words into text with a separator."""

    category = "text/words"

    class Inputs(NodeInputs):
        words: WORDS.annotation = Field(description="Words to join.")
        separator: str = Field(" ", description="Put between words.")

    class Outputs(NodeOutputs):
        text: str

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(text=inputs.separator.join(inputs.words))


NODES = [SplitWords, LongestWords, JoinWords]
TYPES = [WORDS]
