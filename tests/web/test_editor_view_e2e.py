"""End to end: where the canvas looks when a workflow opens, in headless Chromium against a real server.
A graph wider than the view (nodes spread over 4000 px, a group and a note) opens showing all of it; a
small one opens at its size (zoom 1), centred; each tab keeps the view it was left with, and a tab never
shown since the page loaded is fitted when it is first shown. The canvas menu's "Fit to view" fits the
same way.
"""

from __future__ import annotations

import json

import pytest

from _browser import Browser, Page
from _editor import open_editor, open_saved
from test_editor_menus_e2e import choose, menu
from test_editor_tabs_e2e import open_tab
from test_editor_ui_e2e import put_workflow

pytestmark = pytest.mark.slow

# Nine nodes 500 px apart (4000 px from the first to the last), on two rows; a group around the first
# two, a note beyond the last: every kind of thing the opening view must hold.
WIDE = {
    "version": 1,
    "nodes": {f"n{i}": {"type": "Integer", "inputs": {"value": i}} for i in range(9)},
    "ui": {"nodes": {f"n{i}": {"pos": [500 * i, 400 * (i % 2)]} for i in range(9)},
           "groups": [{"id": "g", "title": "start", "color": "#3f789e", "bounds": [-60, -80, 860, 640]}],
           "notes": [{"id": "n", "text": "the far end", "pos": [4300, 700], "size": [220, 90]}]},
}
WIDE_DRAWN = 9 + 1 + 1  # React Flow nodes: the graph's nodes, the group's frame, the note
SMALL = {
    "version": 1,
    "nodes": {"a": {"type": "Integer", "inputs": {"value": 1}}, "b": {"type": "Integer", "inputs": {"value": 2}}},
    "ui": {"nodes": {"a": {"pos": [0, 0]}, "b": {"pos": [300, 60]}}},
}

ZOOM = "Number(/scale\\(([0-9.]+)\\)/.exec(document.querySelector('.react-flow__viewport').style.transform)[1])"
TRANSFORM = "document.querySelector('.react-flow__viewport').style.transform"


async def view(page: Page) -> dict:
    """The canvas's zoom, the pane's box and every drawn node's box (page pixels)."""
    return await page.evaluate(
        "(() => { const box = (e) => { const r = e.getBoundingClientRect();"
        " return { left: r.left, top: r.top, right: r.right, bottom: r.bottom }; };"
        f" return {{ zoom: {ZOOM}, pane: box(document.querySelector('.react-flow__pane')),"
        " nodes: Object.fromEntries([...document.querySelectorAll('.react-flow__node')].map((e) => [e.dataset.id, box(e)])) }; })()")


def outside(shown: dict) -> list[str]:
    """The drawn nodes not wholly inside the pane (half a pixel of rounding allowed)."""
    pane = shown["pane"]
    return [node for node, b in shown["nodes"].items()
            if b["left"] < pane["left"] - 0.5 or b["top"] < pane["top"] - 0.5
            or b["right"] > pane["right"] + 0.5 or b["bottom"] > pane["bottom"] + 0.5]


def assert_wide_fitted(shown: dict) -> None:
    assert len(shown["nodes"]) == WIDE_DRAWN, shown["nodes"].keys()
    assert outside(shown) == [], (outside(shown), shown)
    # Fitted, not merely zoomed far out: the graph spans the pane's width but for the margins.
    left = min(b["left"] for b in shown["nodes"].values())
    right = max(b["right"] for b in shown["nodes"].values())
    pane_width = shown["pane"]["right"] - shown["pane"]["left"]
    assert right - left > 0.85 * pane_width, (right - left, pane_width)
    assert shown["zoom"] < 0.35, shown["zoom"]


def empty_point(shown: dict) -> tuple[float, float]:
    """A point of the pane that no drawn node (nor a group's frame or a note) covers."""
    pane = shown["pane"]
    for fx in (0.5, 0.35, 0.65, 0.2, 0.8):
        for fy in (0.5, 0.35, 0.65, 0.2, 0.8):
            x = pane["left"] + fx * (pane["right"] - pane["left"])
            y = pane["top"] + fy * (pane["bottom"] - pane["top"])
            if not any(b["left"] - 8 <= x <= b["right"] + 8 and b["top"] - 8 <= y <= b["bottom"] + 8
                       for b in shown["nodes"].values()):
                return x, y
    raise AssertionError(f"no empty point in the pane: {shown}")


async def open_file(page: Page, path) -> None:
    document = await page.send("DOM.getDocument")
    node = await page.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="[data-testid=open-file]")
    await page.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(path)])


@pytest.mark.asyncio
async def test_a_workflow_opens_whole_and_each_tab_keeps_its_view(picture_server, tmp_path):
    chromium, base = picture_server
    put_workflow(base, "small.json", SMALL)
    wide_file = tmp_path / "wide.json"
    wide_file.write_text(json.dumps(WIDE))
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)

        # A file opened: nodes 4000 px apart, all of them in view.
        await open_file(page, wide_file)
        await page.wait_for(f"document.querySelectorAll('.react-flow__node').length === {WIDE_DRAWN} && {ZOOM} < 1",
                            what="the wide graph placed in view")
        assert_wide_fitted(await view(page))

        # Looked at closer: the mouse wheel over the pane zooms in there (and another tab is opened at once,
        # before the wheel's gesture is over).
        pane = (await view(page))["pane"]
        before = await page.evaluate(TRANSFORM)
        await page.send("Input.dispatchMouseEvent", type="mouseWheel", x=pane["left"] + 200, y=pane["top"] + 200,
                        deltaX=0, deltaY=-300)
        left_at = await page.wait_for(f"{TRANSFORM} !== {json.dumps(before)} && {TRANSFORM}", what="the view zoomed")

        # A small graph in another tab: drawn at its size, in the middle of the view.
        await page.click("[data-testid=tab-new]")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 0", what="the new tab empty")
        await open_saved(page, "small.json")
        await page.wait_for(f"document.querySelectorAll('.react-flow__node').length === 2 && {ZOOM} === 1",
                            what="the small graph placed in view")
        small = await view(page)
        assert outside(small) == [], small
        nodes = small["nodes"].values()
        middle = ((min(b["left"] for b in nodes) + max(b["right"] for b in nodes)) / 2,
                  (min(b["top"] for b in nodes) + max(b["bottom"] for b in nodes)) / 2)
        pane = small["pane"]
        assert middle == pytest.approx(((pane["left"] + pane["right"]) / 2, (pane["top"] + pane["bottom"]) / 2), abs=1)
        small_at = await page.evaluate(TRANSFORM)

        # Back and forth: each tab where it was left.
        await open_tab(page, 0)
        await page.wait_for(f"{TRANSFORM} === {json.dumps(left_at)}", what="the first tab's view as it was left")
        await open_tab(page, 1)
        await page.wait_for(f"{TRANSFORM} === {json.dumps(small_at)}", what="the second tab's view as it was left")

        # After a reload the open tab is fitted again; the other, never shown since, is fitted when shown.
        await page.send("Page.reload")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to restart")
        await page.wait_for(f"document.querySelectorAll('.react-flow__node').length === 2 && {ZOOM} === 1"
                            f" && {TRANSFORM} !== 'translate(0px, 0px) scale(1)'", what="the small graph placed in view again")
        assert outside(await view(page)) == []
        await open_tab(page, 0)
        await page.wait_for(f"document.querySelectorAll('.react-flow__node').length === {WIDE_DRAWN} && {ZOOM} < 1",
                            what="the wide tab placed in view")
        assert_wide_fitted(await view(page))

        # Looked at closer again, then the canvas menu's "Fit to view": the same view as opening gave.
        fitted = await view(page)
        pane = fitted["pane"]
        await page.send("Input.dispatchMouseEvent", type="mouseWheel", x=pane["left"] + 200, y=pane["top"] + 200,
                        deltaX=0, deltaY=-300)
        await page.wait_for(f"{ZOOM} > {fitted['zoom'] * 1.2}", what="the view zoomed in")
        zoomed = await view(page)
        assert outside(zoomed) != [], "zoomed in, some of the graph is out of view"
        await menu(page, empty_point(zoomed), "canvas")
        await choose(page, "fit-to-view")
        await page.wait_for(f"Math.abs({ZOOM} - {fitted['zoom']}) < 1e-6", what="the view fitted again")
        refitted = await view(page)
        assert_wide_fitted(refitted)
        for node, box in refitted["nodes"].items():
            assert box == pytest.approx(fitted["nodes"][node], abs=1), node
