"""Tests for the prompt weight syntax parser (nodegraph_diffusion.text.prompt)."""

from __future__ import annotations

import pytest

from nodegraph_diffusion.text.prompt import EmbeddingRef, PromptPart, TextSegment, parse_prompt


def weights(parts: list[PromptPart]) -> list[tuple[str, float]]:
    """(text or 'embedding:name', weight) pairs, for compact comparisons."""
    return [(p.text if isinstance(p, TextSegment) else f"embedding:{p.name}", p.weight) for p in parts]


def assert_parts(text: str, expected: list[tuple[str, float]]) -> None:
    got = weights(parse_prompt(text))
    assert [t for t, _ in got] == [t for t, _ in expected], text
    assert [w for _, w in got] == pytest.approx([w for _, w in expected]), text


def test_plain_text_is_one_segment() -> None:
    assert parse_prompt("a photo of a cat, 4k") == [TextSegment("a photo of a cat, 4k", 1.0)]
    assert parse_prompt("") == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.21)]),
        ("(((cat)))", [("cat", 1.331)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("[[cat]]", [("cat", 1 / 1.21)]),
        ("([cat])", [("cat", 1.0)]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("(cat: 1.3 )", [("cat", 1.3)]),
        ("(cat:.5)", [("cat", 0.5)]),
        ("(cat:0)", [("cat", 0.0)]),
        ("(cat:-1)", [("cat", -1.0)]),
        ("(cat:+2)", [("cat", 2.0)]),
        ("((cat:1.5))", [("cat", 1.65)]),
        ("[(cat:1.5)]", [("cat", 1.5 / 1.1)]),
        ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
        ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
        ("(big cat, fluffy:1.2), tail", [("big cat, fluffy", 1.2), (", tail", 1.0)]),
    ],
)
def test_emphasis(text: str, expected: list[tuple[str, float]]) -> None:
    assert_parts(text, expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(cat:big)", [("cat:big", 1.1)]),  # not a number: literal text, plain emphasis
        ("(cat:1.2.3)", [("cat:1.2.3", 1.1)]),
        ("time 10:30", [("time 10:30", 1.0)]),
        ("(a:1.2", [("a:1.2", 1.1)]),  # unclosed: the ":1.2" never meets its ")"
    ],
)
def test_colons_that_are_not_weights(text: str, expected: list[tuple[str, float]]) -> None:
    assert_parts(text, expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\(cat\)", [("(cat)", 1.0)]),
        (r"\[cat\]", [("[cat]", 1.0)]),
        (r"(\(cat\):1.2)", [("(cat)", 1.2)]),
        (r"cat\:1.2)", [("cat:1.2)", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"\\(cat)", [("\\", 1.0), ("cat", 1.1)]),  # an escaped backslash does not escape the bracket
        (r"C:\Users\me", [("C:\\Users\\me", 1.0)]),  # a backslash before anything else stays
    ],
)
def test_escapes(text: str, expected: list[tuple[str, float]]) -> None:
    assert_parts(text, expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cat)", [("cat)", 1.0)]),
        ("cat]", [("cat]", 1.0)]),
        ("a :1.3) b", [("a :1.3) b", 1.0)]),
        ("(cat", [("cat", 1.1)]),
        ("[cat", [("cat", 1 / 1.1)]),
        ("a ((b", [("a ", 1.0), ("b", 1.21)]),
        ("(a]", [("a]", 1.1)]),
        ("[a)", [("a)", 1 / 1.1)]),
        ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),
        ("((a) b", [("a", 1.21), (" b", 1.1)]),
        (")(", [(")", 1.0)]),
    ],
)
def test_unbalanced_brackets(text: str, expected: list[tuple[str, float]]) -> None:
    assert_parts(text, expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("embedding:style", [("embedding:style", 1.0)]),
        ("a embedding:style, b", [("a ", 1.0), ("embedding:style", 1.0), (", b", 1.0)]),
        ("embedding:style.safetensors", [("embedding:style.safetensors", 1.0)]),
        ("embedding:sub/style-v2_final", [("embedding:sub/style-v2_final", 1.0)]),
        ("the end embedding:style.", [("the end ", 1.0), ("embedding:style", 1.0), (".", 1.0)]),
        ("(embedding:style:1.2)", [("embedding:style", 1.2)]),
        ("(embedding:style.pt:0.8)", [("embedding:style.pt", 0.8)]),
        ("((embedding:style))", [("embedding:style", 1.21)]),
        ("[embedding:style]", [("embedding:style", 1 / 1.1)]),
        ("Embedding:Style", [("embedding:Style", 1.0)]),
        ("x,embedding:style", [("x,", 1.0), ("embedding:style", 1.0)]),
        ("embedding:a embedding:b", [("embedding:a", 1.0), (" ", 1.0), ("embedding:b", 1.0)]),
        ("myembedding:style", [("myembedding:style", 1.0)]),
        ("embedding: style", [("embedding: style", 1.0)]),
        ("embedding:...", [("embedding:...", 1.0)]),
    ],
)
def test_embedding_references(text: str, expected: list[tuple[str, float]]) -> None:
    assert_parts(text, expected)


def test_embedding_ref_is_its_own_part() -> None:
    parts = parse_prompt("(embedding:style:1.2) cat")
    assert parts == [EmbeddingRef("style", 1.2), TextSegment(" cat", 1.0)]


def test_adjacent_equal_weights_merge() -> None:
    assert parse_prompt("(a)(b) c") == [TextSegment("ab", pytest.approx(1.1)), TextSegment(" c", 1.0)]
    assert parse_prompt("a\\(b") == [TextSegment("a(b", 1.0)]


def test_multiline_prompt() -> None:
    assert_parts("line one\n(line two)\nline three", [("line one\n", 1.0), ("line two", 1.1), ("\nline three", 1.0)])
