"""End to end (issue 17): workflow tabs in headless Chromium against a real server: several graphs open
at once, each with its own undo history and its own runs, all reopened after a reload.
"""

from __future__ import annotations

import json

import pytest

from _browser import Browser, Page
from _editor import open_editor, text_of
from test_editor_canvas_e2e import graph

pytestmark = pytest.mark.slow

PROMPT = "[data-testid=input-draw-prompt]"


async def tab_names(page: Page) -> list[str]:
    return await page.evaluate("[...document.querySelectorAll('[data-testid=tabs] .tab-name')].map(e => e.textContent)")


async def open_tab(page: Page, index: int) -> None:
    await page.mouse_click(await page.centre(f"[data-testid=tab-{index}] .tab-name"))
    await page.wait_for(f"document.querySelector('[data-testid=tab-{index}]').classList.contains('active')",
                        what=f"tab {index} open")


@pytest.mark.asyncio
async def test_tabs_keep_their_own_graph_undo_history_and_runs(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        assert await tab_names(page) == ["txt2img.json"]
        await page.type_into(PROMPT, "the first tab's prompt")
        await page.evaluate(f"document.querySelector({json.dumps(PROMPT)}).blur()")
        await page.type_into("[data-testid=input-draw-steps]", "30")  # a run long enough to switch tabs during it
        await page.evaluate("document.querySelector('[data-testid=input-draw-steps]').blur()")

        # A second tab: its own graph.
        await page.click("[data-testid=tab-new]")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 0", what="the new tab empty")
        await page.click("[data-testid=palette-Integer]")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 1", what="a node in tab 2")
        assert await tab_names(page) == ["txt2img.json", "untitled.json"]

        # Back to the first: its graph as it was left; run it, and watch the run from the other tab.
        await open_tab(page, 0)
        assert await page.evaluate(text_of(PROMPT)) == "the first tab's prompt"
        await page.click("[data-testid=run]")
        await page.wait_for("document.querySelector('[data-testid=node-draw][data-status=running]') !== null",
                            what="the run on the first tab's nodes")
        await open_tab(page, 1)
        await page.wait_for("document.querySelector('[data-testid=tab-running-0]') !== null", what="tab 1 marked running")
        assert await page.evaluate("document.querySelector('[data-status=running].graph-node')") is None
        assert await page.evaluate("document.querySelector('[data-testid=tab-running-1]')") is None
        # Undo here takes this tab's node away, and nothing of the other tab.
        await page.evaluate("document.activeElement?.blur()")
        await page.shortcut("z")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 0", what="tab 2's node undone")
        await page.wait_for("document.querySelector('[data-testid=tab-running-0]') === null", timeout=60, what="the run done")
        assert await page.evaluate("document.querySelector('[data-testid^=media-]')") is None
        await open_tab(page, 0)
        await page.wait_for("document.querySelector('[data-testid=media-save][data-kind=image]') !== null",
                            what="the image on the first tab's save node")
        assert await page.evaluate(text_of(PROMPT)) == "the first tab's prompt"

        # After a reload both tabs are back, the open one open, each graph as it was.
        await page.send("Page.reload")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to restart")
        await page.wait_for("document.querySelectorAll('[data-testid=tabs] .tab').length === 2", what="two tabs again")
        assert await tab_names(page) == ["txt2img.json", "untitled.json"]
        await page.wait_for(f"{text_of(PROMPT)} === \"the first tab's prompt\"", what="the first tab's graph")
        await page.wait_for("document.querySelector('[data-testid=media-save][data-kind=image]') !== null",
                            what="its image, its run still its own")
        await open_tab(page, 1)
        assert (await graph(page))["nodes"] == {}
        await page.click("[data-testid=tab-close-1]")
        await page.wait_for("document.querySelectorAll('[data-testid=tabs] .tab').length === 1", what="one tab left")
        assert await tab_names(page) == ["txt2img.json"]
