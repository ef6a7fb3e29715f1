"""Prompt weight syntax as A1111 and ComfyUI users write it, parsed into weighted text and embedding references.

Syntax (A1111's emphasis rules; every bracket level multiplies):

- ``(text)`` multiplies the weight of `text` by 1.1, ``((text))`` by 1.21, ``[text]`` divides by 1.1.
- ``(text:1.3)`` multiplies by 1.3 instead of 1.1; inside other brackets the factors multiply,
  so ``((text:1.5))`` is 1.65 and ``[(text:1.5)]`` is 1.5 / 1.1. (ComfyUI would read the
  explicit number as absolute and ``[...]`` as literal text; A1111's reading is kept so that
  both bracket kinds follow one rule.) The number may be signed, may have spaces around it
  and may be written ``.5``; anything else after the colon is literal text.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\:`` and ``\\\\`` are the literal characters; a backslash
  before anything else stays a backslash.
- ``embedding:name`` (also ``embedding:name.safetensors`` or ``embedding:sub/name``) refers to
  a textual-inversion embedding; it takes the weight of the brackets around it, e.g.
  ``(embedding:name:1.2)``. The prefix is case-insensitive and must start a word; the name ends
  at whitespace, a comma, a bracket, a colon or a backslash, and trailing dots are dropped (a
  sentence ending right after the name).

Unbalanced brackets, as A1111 reads them: a closing bracket with nothing open of its kind is
literal text; a bracket still open at the end of the prompt applies to everything after it.
Round and square brackets are matched each on their own, so ``(a [b) c]`` gives a 1.1, b 1.0,
c 1/1.1. A weight close ``:1.3)`` with no ``(`` open is literal text. Not supported: A1111's
prompt editing ``[a:b:step]`` and alternation ``[a|b]`` (read as plain square-bracket
emphasis), ``BREAK``, and ComfyUI's other custom syntaxes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_LEXER = re.compile(
    rf"""
    \\(?P<escaped>[()\[\]:\\])
  | (?P<open>[(\[])
  | :\s*(?P<weight>{_NUMBER})\s*\)
  | (?P<close>[)\]])
  | (?<!\w)(?i:embedding):(?P<embedding>[^\s,()\[\]:\\]+)
  | (?P<text>\w+|\s+|.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class TextSegment:
    """Prompt text with one weight."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class EmbeddingRef:
    """A textual-inversion embedding named in the prompt (the name as written, extension included if given)."""

    name: str
    weight: float = 1.0


PromptPart = TextSegment | EmbeddingRef


def parse_prompt(text: str) -> list[PromptPart]:
    """Split a prompt into weighted text segments and embedding references, in order.

    Adjacent text with equal weight is merged; empty text is left out.
    """
    parts: list[list] = []  # [kind, value, weight], kind "text" or "embedding"
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[2] *= factor

    for match in _LEXER.finditer(text):
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "escaped":
            parts.append(["text", value, 1.0])
        elif kind == "open":
            (round_open if value == "(" else square_open).append(len(parts))
        elif kind == "weight" and round_open:
            scale(round_open.pop(), float(value))
        elif kind == "close" and value == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif kind == "close" and value == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        elif kind == "embedding" and value.rstrip("."):
            parts.append(["embedding", value.rstrip("."), 1.0])
            trailing_dots = value[len(value.rstrip(".")) :]
            if trailing_dots:
                parts.append(["text", trailing_dots, 1.0])
        else:
            parts.append(["text", match.group(0), 1.0])
    for start in round_open:
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)
    return _merge(parts)


def _merge(parts: list[list]) -> list[PromptPart]:
    merged: list[PromptPart] = []
    for kind, value, weight in parts:
        if kind == "embedding":
            merged.append(EmbeddingRef(value, weight))
        elif merged and isinstance(merged[-1], TextSegment) and merged[-1].weight == weight:
            merged[-1] = TextSegment(merged[-1].text + value, weight)
        elif value:
            merged.append(TextSegment(value, weight))
    return merged
