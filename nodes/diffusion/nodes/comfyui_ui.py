"""The ComfyUI editor's own objects in a UI-format file, as our document's `ui` block keeps them:
node titles, colours and collapsed state (`ui.nodes`), groups (`ui.groups`), notes (`ui.notes`)
and the points of legacy Reroute nodes (`ui.reroutes`). None of it changes what runs."""

from __future__ import annotations

import re
from typing import Any

from .comfyui_subgraphs import NOTE_TYPES, node_position

# A note the file gives no size keeps the size ComfyUI's editor makes a new note.
DEFAULT_NOTE_SIZE = (400.0, 160.0)

_HEX_COLOR = re.compile(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def css_color(value: Any) -> str | None:
    """`#rrggbb` (lower case) for ComfyUI's `#rgb` and `#rrggbb` colours; None for anything else."""
    if not isinstance(value, str) or not _HEX_COLOR.fullmatch(value):
        return None
    digits = value[1:].lower()
    return "#" + ("".join(digit * 2 for digit in digits) if len(digits) == 3 else digits)


def _numbers(value: Any, count: int) -> list[float] | None:
    """`count` numbers from a list or from the older `{"0": a, "1": b, ...}` form; None otherwise."""
    if isinstance(value, dict):
        value = [value.get(str(index)) for index in range(count)]
    if (isinstance(value, list) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return [float(v) for v in value]
    return None


def node_color(node: dict[str, Any]) -> str | None:
    """A node's colour: ComfyUI sets a title colour (`color`) and a body colour (`bgcolor`) together;
    the body is what a node shows most of, so it is the one kept, the title's when there is no body's."""
    return css_color(node.get("bgcolor")) or css_color(node.get("color"))


def node_decorations(node: dict[str, Any]) -> dict[str, Any]:
    """`{title?, color?, collapsed?}` of a UI node: what the editor shows of it beyond its place and inputs."""
    entry: dict[str, Any] = {}
    title = node.get("title")
    if isinstance(title, str) and title.strip():
        entry["title"] = title
    color = node_color(node)
    if color is not None:
        entry["color"] = color
    flags = node.get("flags")
    if isinstance(flags, dict) and flags.get("collapsed") is True:
        entry["collapsed"] = True
    return entry


def groups(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The file's groups as `{id, title, color, bounds: [x, y, w, h]}` (a group without readable
    bounds is left out: it frames nothing)."""
    found: list[dict[str, Any]] = []
    used: set[str] = set()
    raw_groups = document.get("groups")
    for index, group in enumerate(raw_groups if isinstance(raw_groups, list) else []):
        if not isinstance(group, dict):
            continue
        bounds = _numbers(group.get("bounding"), 4)
        if bounds is None:
            continue
        group_id = group.get("id")
        # Older editors saved groups without ids.
        group_id = str(group_id) if isinstance(group_id, (int, str)) and not isinstance(group_id, bool) else None
        if group_id is None or group_id in used:
            number = index + 1
            while f"group{number}" in used:
                number += 1
            group_id = f"group{number}"
        used.add(group_id)
        title = group.get("title")
        found.append({"id": group_id, "title": title if isinstance(title, str) else "",
                      # ComfyUI's default group colour, for a group saved without one.
                      "color": css_color(group.get("color")) or "#3f789e", "bounds": bounds})
    return found


def notes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Note and MarkdownNote nodes as `{id, text, pos, size, color?}`."""
    found = []
    for node in nodes:
        if node.get("type") not in NOTE_TYPES:
            continue
        values = node.get("widgets_values")
        text = values[0] if isinstance(values, list) and values and isinstance(values[0], str) else ""
        size = _numbers(node.get("size"), 2) or list(DEFAULT_NOTE_SIZE)
        note: dict[str, Any] = {"id": str(node["id"]), "text": text, "pos": node_position(node) or [0.0, 0.0],
                                "size": size}
        color = node_color(node)
        if color is not None:
            note["color"] = color
        found.append(note)
    return found


def reroute_points(crossed: list[tuple[str, str, list[str]]], by_id: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`{id, pos, to: {node, input}}` for each Reroute node crossed on the way into a node's input.

    `crossed` holds (node id, our input name, reroute ids nearest the node first) for every link
    that passed reroutes. A reroute that feeds several inputs becomes one point on each link, the
    first keeping its id and the others numbered after it (`12`, `12/2`, ...)."""
    points: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for node_id, input_name, reroutes in crossed:
        for reroute in reversed(reroutes):  # from the source towards the node, as the link runs
            seen[reroute] = seen.get(reroute, 0) + 1
            point_id = reroute if seen[reroute] == 1 else f"{reroute}/{seen[reroute]}"
            points.append({"id": point_id, "pos": node_position(by_id[reroute]) or [0.0, 0.0],
                           "to": {"node": node_id, "input": input_name}})
    return points
