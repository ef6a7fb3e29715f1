"""End to end (issue 17): New, Ctrl+A, Ctrl+S, the shortcut sheet, the minimap shown or hidden, and the
txt2img graph whole in view when it opens; headless Chromium at 1600x1000 against a real server.
"""

from __future__ import annotations

import json

import pytest

from _browser import Browser
from _editor import ROOT, get_json, open_editor, open_saved
from test_editor_ui_e2e import put_workflow
from test_editor_view_e2e import ZOOM, outside, view

pytestmark = pytest.mark.slow


@pytest.mark.asyncio
async def test_the_txt2img_graph_opens_whole(picture_server, tmp_path):
    chromium, base = picture_server
    put_workflow(base, "sd-txt2img.json", json.loads((ROOT / "workflows" / "txt2img.json").read_text()))
    async with Browser(chromium, tmp_path / "profile", width=1600, height=1000) as page:
        await open_editor(page, base, workflow=None)
        await open_saved(page, "sd-txt2img.json")
        await page.wait_for("document.querySelectorAll('.react-flow__edge').length === 10", what="the links drawn")
        # (The picture graph opened at the start is shown at zoom 1; this one needs less to fit.)
        await page.wait_for(f"{ZOOM} < 1", what="the graph placed in view")
        shown = await view(page)
        assert len(shown["nodes"]) == 7, shown["nodes"].keys()
        assert outside(shown) == [], shown  # (at 1600x1000 it fits at a zoom of about 0.72)
        assert shown["zoom"] <= 1, shown


@pytest.mark.asyncio
async def test_new_select_all_save_the_shortcut_sheet_and_the_minimap(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile", width=1600, height=1000) as page:
        await open_editor(page, base)
        # Ctrl+A selects every node.
        await page.evaluate("document.activeElement?.blur()")
        await page.shortcut("a")
        await page.wait_for("document.querySelectorAll('.react-flow__node.selected').length === 3", what="all selected")

        # Ctrl+S saves under the name in the box, also while typing in a field.
        await page.type_into("[data-testid=workflow-name]", "saved-by-keys")
        await page.evaluate("document.querySelector('[data-testid=input-draw-prompt]').focus()")
        await page.shortcut("s")
        await page.wait_for("[...document.querySelectorAll('[data-testid=open-saved] option')]"
                            ".some(o => o.value === 'saved-by-keys.json')", what="saved by Ctrl+S")
        assert get_json(f"{base}/api/workflows/saved-by-keys.json")["nodes"]["draw"]["type"] == "PromptPicture"

        # "?" opens the shortcut sheet, listing the keys; Escape closes it.
        await page.evaluate("document.activeElement?.blur()")
        await page.press("?", "Slash", 191, 8)
        await page.wait_for("document.querySelector('[data-testid=shortcuts]') !== null", what="the shortcut sheet")
        sheet = await page.evaluate("document.querySelector('[data-testid=shortcuts]').textContent")
        for keys in ("Ctrl+S", "Ctrl+B", "Ctrl+M", "Ctrl+A", "Ctrl+G", "double-click the canvas"):
            assert keys in sheet, keys
        await page.press("Escape", "Escape", 27)
        await page.wait_for("document.querySelector('[data-testid=shortcuts]') === null", what="the sheet closed")

        # The minimap hides, and stays hidden after a reload.
        assert await page.evaluate("document.querySelector('.react-flow__minimap') !== null")
        await page.click("[data-testid=minimap-toggle]")
        await page.wait_for("document.querySelector('.react-flow__minimap') === null", what="the minimap hidden")
        await page.send("Page.reload")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to restart")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 3", what="the graph back")
        assert await page.evaluate("document.querySelector('.react-flow__minimap')") is None
        await page.click("[data-testid=minimap-toggle]")
        await page.wait_for("document.querySelector('.react-flow__minimap') !== null", what="the minimap back")

        # New clears the canvas.
        await page.click("[data-testid=new]")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 0", what="an empty canvas")
