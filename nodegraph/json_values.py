"""JSON from outside the process (request bodies, workflow files, `--set` values): decoded with
errors that say what is wrong, and checked so that whatever is accepted is standard JSON that
every client can read back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 64
"""Containers nested deeper than this are refused. No real document comes near it (a workflow is
about six levels deep), and much deeper ones reach Python's recursion limit in encoders and
validators, far from where they came in."""

MAX_PROBLEMS = 20
"""A value checked for problems reports at most this many: enough to act on, bounded in size."""


class JsonRefused(ValueError):
    """Text that is not acceptable JSON. `code` is machine-readable; the message says where and why."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}


def _refuse_constant(name: str) -> Any:
    raise JsonRefused("not_finite", f"{name} is not a JSON number; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused("not_finite", f"the number {text[:40]} is out of range; numbers must be finite")
    return value


def decode_json(data: str | bytes | bytearray, source: str = "JSON") -> Any:
    """Decode JSON text (bytes must be UTF-8). Raises JsonRefused, naming `source`, for text that is
    not UTF-8 or not JSON, for NaN, Infinity and numbers out of float range, for integers too long
    to convert, and for nesting deeper than Python's recursion allows."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise JsonRefused("not_utf8", f"{source}: not UTF-8 text (byte {error.start}: {error.reason})",
                              {"position": error.start}) from None
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except JsonRefused as error:
        raise JsonRefused(error.code, f"{source}: {error}") from None
    except json.JSONDecodeError as error:
        raise JsonRefused("invalid_json", f"{source}: {error.msg} at line {error.lineno}, column {error.colno}",
                          {"line": error.lineno, "column": error.colno}) from None
    except RecursionError:
        raise JsonRefused("too_deep", f"{source}: nested too deeply to decode (documents may nest {MAX_DEPTH} levels)") from None
    except ValueError as error:  # an integer literal longer than int() converts (sys.get_int_max_str_digits)
        raise JsonRefused("number_too_long", f"{source}: a number is too long: {error}") from None


@dataclass(frozen=True)
class JsonProblem:
    """One value inside a document that is not standard JSON, and where: `path` from the root."""

    path: tuple[str | int, ...]
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return "/".join(str(part) for part in self.path) or "(the document)"


def _is_text(value: str) -> bool:
    """Whether a string can be written as UTF-8 (a lone surrogate such as '\\ud800' cannot)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _spelled(where: tuple[Any, str | int] | None) -> tuple[str | int, ...]:
    """A path kept as nested (parent, key) pairs, spelled out from the root."""
    parts: list[str | int] = []
    while where is not None:
        where, key = where
        parts.append(key)
    return tuple(reversed(parts))


def json_problems(value: Any, max_depth: int = MAX_DEPTH, limit: int = MAX_PROBLEMS) -> list[JsonProblem]:
    """What keeps `value` (a decoded document) from being standard JSON text: nesting deeper than
    `max_depth`, non-finite numbers, strings (or keys) with lone surrogates, and values of other
    Python types. Walks without recursion, so any depth is safe to check; at most `limit` problems,
    in document order. Each value's place is kept as a (parent's place, key) pair and spelled out
    as a path only for a problem: most documents have none."""
    problems: list[JsonProblem] = []
    stack: list[tuple[Any, int, tuple[Any, str | int] | None]] = [(value, 0, None)]
    while stack and len(problems) < limit:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                problems.append(JsonProblem(_spelled(where), "invalid_text", "text contains a lone surrogate "
                                            "(such as \\ud800), which is not Unicode text"))
        elif isinstance(item, float):
            if not math.isfinite(item):
                problems.append(JsonProblem(_spelled(where), "not_finite",
                                            f"{item} is not a JSON number; numbers must be finite"))
        elif item is None or isinstance(item, (bool, int)):
            continue
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                problems.append(JsonProblem(_spelled(where), "too_deep", f"nested more than {max_depth} levels deep",
                                            {"max_depth": max_depth}))
                continue
            depth += 1
            if isinstance(item, list):
                stack.extend((item[index], depth, (where, index)) for index in range(len(item) - 1, -1, -1))
                continue
            children = []
            for key, child in item.items():
                if not isinstance(key, str):
                    problems.append(JsonProblem(_spelled(where), "not_json", f"key {key!r} is not a string"))
                elif not _is_text(key):
                    problems.append(JsonProblem((*_spelled(where), key.encode("utf-8", "backslashreplace").decode()),
                                                "invalid_text", "a key contains a lone surrogate (such as \\ud800), "
                                                "which is not Unicode text"))
                else:
                    children.append((child, depth, (where, key)))
            stack.extend(reversed(children))
        else:
            problems.append(JsonProblem(_spelled(where), "not_json", f"a {type(item).__name__} is not a JSON value"))
    return problems[:limit]
