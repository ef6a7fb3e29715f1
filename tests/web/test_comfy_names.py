"""The editor's table of ComfyUI node names (web/src/comfyNames.ts), which its node search finds our
nodes by, agrees with the diffusion pack's ComfyUI mapping (nodes/diffusion/nodes/comfyui.py).

GET /api/nodes does not carry ComfyUI names yet; until it does, the editor ships this table.
`python tests/web/test_comfy_names.py --write` rewrites it from the mapping. The test fails on a
name the mapping no longer sends to that node type, or on a missing core name; a mapping row added
since the table was written is only not found by the search until the table is rewritten.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from nodegraph_diffusion.nodes import comfyui

TABLE = Path(__file__).resolve().parents[2] / "web" / "src" / "comfyNames.ts"
HEADER = """\
// ComfyUI's names for our node types (generated from nodes/diffusion/nodes/comfyui.py MAPPINGS by
// `python tests/web/test_comfy_names.py --write`; tests/web/test_comfy_names.py keeps it equal), so the
// node search finds TextEncode by "CLIPTextEncode". Used for a node type whose catalogue entry does not
// carry its own `comfyui_names`.

export const COMFYUI_NAMES: Record<string, string[]> = """


def expected_names() -> dict[str, list[str]]:
    """Our node type -> the ComfyUI node types that import as it, sorted."""
    names: dict[str, list[str]] = {}
    for comfy_type, mapping in comfyui.MAPPINGS.items():
        names.setdefault(mapping.type, []).append(comfy_type)
    return {ours: sorted(theirs) for ours, theirs in sorted(names.items())}


def table_text(names: dict[str, list[str]]) -> str:
    return HEADER + json.dumps(names, indent=2) + ";\n"


def read_table(text: str) -> dict[str, list[str]]:
    found = re.search(r"COMFYUI_NAMES: Record<string, string\[\]> = (\{.*\});\s*$", text, re.DOTALL)
    assert found is not None, f"{TABLE}: no COMFYUI_NAMES object"
    return json.loads(found.group(1))


# The names a ComfyUI user types first (issue 17); the search must find each.
CORE_NAMES = ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "EmptyLatentImage", "VAEDecode", "SaveImage",
              "LoraLoader", "VAEEncode", "LoadImage", "ControlNetLoader", "ControlNetApplyAdvanced")


def test_comfyui_names_agree_with_the_mapping():
    mapping = {comfy_type: row.type for comfy_type, row in comfyui.MAPPINGS.items()}
    table = read_table(TABLE.read_text())
    wrong = {comfy: ours for ours, names in table.items() for comfy in names if mapping.get(comfy) != ours}
    assert not wrong, f"comfyNames.ts names ComfyUI types the mapping sends elsewhere: {wrong}; run --write"
    listed = {comfy for names in table.values() for comfy in names}
    assert set(CORE_NAMES) <= listed, f"missing: {set(CORE_NAMES) - listed}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite web/src/comfyNames.ts from the mapping")
    if parser.parse_args().write:
        TABLE.write_text(table_text(expected_names()))
