"""End to end (issue 17): right-click menus on the canvas, a node, a link and a group, in headless
Chromium against a real server; each item checked by what it does to the workflow document.
"""

from __future__ import annotations

import json

import pytest

from _browser import Browser, Page
from _editor import open_editor
from test_editor_canvas_e2e import canvas_point, graph, graph_expression
from test_editor_ui_e2e import point_on_link

pytestmark = pytest.mark.slow


async def menu(page: Page, point: tuple[float, float], kind: str) -> None:
    """Right-click at a point and wait for the menu of that kind."""
    await page.mouse_click(point, button="right")
    await page.wait_for(f"document.querySelector('[data-testid=menu-{kind}]') !== null", what=f"the {kind} menu")


async def choose(page: Page, item: str) -> None:
    await page.mouse_click(await page.centre(f"[data-testid=menu-item-{item}]"))
    await page.wait_for("document.querySelector('.context-menu') === null", what="the menu closed")


@pytest.mark.asyncio
async def test_right_click_menus_on_canvas_node_link_and_group(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        draw_title = "[data-testid=node-draw] .node-id"

        # Node: colour, rename, bypass, collapse.
        await menu(page, await page.centre(draw_title), "node")
        await page.mouse_click(await page.centre("[data-testid=menu-color-red]"))
        await page.wait_for(f"{graph_expression()}.ui.nodes.draw.color === '#8c3a3a'", what="draw coloured red")
        await menu(page, await page.centre(draw_title), "node")
        await choose(page, "rename")
        await page.wait_for("document.querySelector('[data-testid=title-draw-input]') === document.activeElement",
                            what="the title open for typing")
        await page.send("Input.insertText", text="Painter")
        await page.press("Enter", "Enter", 13)
        await page.wait_for(f"{graph_expression()}.ui.nodes.draw.title === 'Painter'", what="draw renamed")
        await menu(page, await page.centre(draw_title), "node")
        await choose(page, "bypass")
        await page.wait_for(f"{graph_expression()}.nodes.draw.mode === 'bypass'", what="draw bypassed")
        await menu(page, await page.centre(draw_title), "node")
        assert await page.evaluate("document.querySelector('[data-testid=menu-item-stop-bypassing]') !== null")
        await choose(page, "stop-bypassing")
        await page.wait_for(f"!('mode' in {graph_expression()}.nodes.draw)", what="draw runs again")
        await menu(page, await page.centre(draw_title), "node")
        await choose(page, "duplicate")
        await page.wait_for(f"'prompt_picture' in {graph_expression()}.nodes", what="a copy of draw")
        copy = (await graph(page))["nodes"]["prompt_picture"]
        assert copy["inputs"]["prompt"] == (await graph(page))["nodes"]["draw"]["inputs"]["prompt"]
        await menu(page, await page.centre("[data-testid=node-prompt_picture] .node-id"), "node")
        await choose(page, "delete")
        await page.wait_for(f"!('prompt_picture' in {graph_expression()}.nodes)", what="the copy deleted")

        # Link: a reroute point where it was clicked; delete.
        await menu(page, await point_on_link(page, "save:image"), "link")
        await choose(page, "add-reroute-point-here")
        await page.wait_for(f"{graph_expression()}.ui.reroutes?.[0]?.to.node === 'save'", what="a point on the link")
        await menu(page, await point_on_link(page, "draw:seed"), "link")
        await choose(page, "delete-link")
        await page.wait_for(f"!({graph_expression()}.nodes.draw.inputs.seed?.from)", what="the link deleted")

        # Canvas: add a group there, then the group's menu: rename, colour, remove (its nodes stay).
        spot = await canvas_point(page, 0.05, 0.06)
        await menu(page, spot, "canvas")
        await choose(page, "add-group")
        await page.wait_for(f"{graph_expression()}.ui.groups?.length === 1", what="a group added")
        group = (await graph(page))["ui"]["groups"][0]
        title = f"[data-testid=group-{group['id']}] .frame-title"
        await menu(page, await page.centre(title), "group")
        await page.mouse_click(await page.centre("[data-testid=menu-color-green]"))
        await page.wait_for(f"{graph_expression()}.ui.groups[0].color === '#3c6b3c'", what="the group green")
        await menu(page, await page.centre(title), "group")
        await choose(page, "rename")
        await page.wait_for(f"document.querySelector('[data-testid=group-title-{group['id']}-input]') === document.activeElement",
                            what="the group title open")
        await page.send("Input.insertText", text="Inputs")
        await page.press("Enter", "Enter", 13)
        await page.wait_for(f"{graph_expression()}.ui.groups[0].title === 'Inputs'", what="the group renamed")
        await menu(page, await page.centre(title), "group")
        await choose(page, "remove-group")
        await page.wait_for(f"!{graph_expression()}.ui.groups", what="the group removed")
        assert set((await graph(page))["nodes"]) == {"seed", "draw", "save"}

        # Canvas: a note there; Escape closes a menu without doing anything.
        await menu(page, await canvas_point(page, 0.5, 0.9), "canvas")
        await page.press("Escape", "Escape", 27)
        await page.wait_for("document.querySelector('.context-menu') === null", what="the menu closed by Escape")
        await menu(page, await canvas_point(page, 0.5, 0.9), "canvas")
        await choose(page, "add-note")
        await page.wait_for(f"{graph_expression()}.ui.notes?.length === 1", what="a note added")
        assert json.dumps((await graph(page))["ui"]["notes"][0]["text"]) == '""'
