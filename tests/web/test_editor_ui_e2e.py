"""End to end (issue 17): what the `ui` block holds beside the graph, in headless Chromium against a
real server: groups (titled, coloured frames that move their nodes), notes (markdown), reroute points
on links, collapsed, renamed and coloured nodes; read from a saved workflow and made on the canvas,
and written back in the agreed format.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from _browser import SHIFT, Browser, Page
from _editor import PICTURE_WORKFLOW, open_editor, open_saved
from test_editor_canvas_e2e import canvas_point, graph, graph_expression, new_canvas, search_and_add, select_node

pytestmark = pytest.mark.slow


def put_workflow(base: str, name: str, document: dict) -> None:
    request = urllib.request.Request(f"{base}/api/workflows/{name}", data=json.dumps(document).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


async def box(page: Page, selector: str) -> list[float]:
    return await page.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                               " return [r.left, r.top, r.width, r.height]; })()")


async def point_on_link(page: Page, edge_id: str) -> tuple[float, float]:
    """The middle of a drawn link, in page coordinates."""
    return tuple(await page.evaluate(
        f"(() => {{ const p = document.querySelector('.react-flow__edge[data-id={json.dumps(edge_id)}] path.react-flow__edge-path');"
        " const q = p.getPointAtLength(p.getTotalLength() / 2); const m = p.getScreenCTM();"
        " return [q.x * m.a + m.e, q.y * m.d + m.f]; })()"))


@pytest.mark.asyncio
async def test_a_saved_ui_block_is_drawn_and_written_back(picture_server, tmp_path):
    chromium, base = picture_server
    document = json.loads(PICTURE_WORKFLOW.read_text())
    document["ui"]["nodes"]["draw"].update(title="Painter", color="#355a8c")
    document["ui"]["nodes"]["save"]["collapsed"] = True
    document["ui"]["groups"] = [{"id": "g1", "title": "Making the picture", "color": "#8c3a3a", "bounds": [0, 0, 680, 420]}]
    document["ui"]["notes"] = [{"id": "n1", "text": "# Read me\nThe **seed** changes the colour.", "pos": [40, 460],
                                "size": [300, 120], "color": "#807028"}]
    document["ui"]["reroutes"] = [{"id": "r1", "pos": [640, 300], "to": {"node": "save", "input": "image"}}]
    document["ui"]["layers"] = {"kept": True}  # not the editor's: kept as it is
    put_workflow(base, "with-ui.json", document)
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base, workflow=None)
        await open_saved(page, "with-ui.json")
        await page.wait_for("document.querySelector('[data-testid=group-g1]') !== null", what="the group drawn")
        assert await page.evaluate("document.querySelector('[data-testid=group-title-g1]').textContent") == "Making the picture"
        assert await page.evaluate("document.querySelector('[data-testid=note-n1] h1').textContent") == "Read me"
        assert await page.evaluate("document.querySelector('[data-testid=note-n1] strong').textContent") == "seed"
        assert await page.evaluate("document.querySelector('[data-testid=title-draw]').textContent") == "Painter"
        assert await page.evaluate("getComputedStyle(document.querySelector('[data-testid=node-draw] .node-title'))"
                                   ".backgroundColor") == "rgb(53, 90, 140)"
        assert await page.evaluate("document.querySelector('[data-testid=node-save]').dataset.collapsed") == "true"
        assert await page.evaluate("document.querySelector('[data-testid=reroute-r1]') !== null")
        # The link into save passes through its reroute point.
        dot = await box(page, "[data-testid=reroute-r1]")
        link = await page.evaluate("(() => { const p = document.querySelector('.react-flow__edge[data-id=\"save:image\"] path');"
                                   " return p.getAttribute('d'); })()")
        assert link.count(" C ") == 2, link  # two curves: output -> point -> input
        assert dot[2] > 0
        written = (await graph(page))["ui"]
        for key in ("groups", "notes", "reroutes", "layers"):
            assert written[key] == document["ui"][key], key
        assert written["nodes"]["draw"] == {"pos": [330, 60], "title": "Painter", "color": "#355a8c"}
        assert written["nodes"]["save"]["collapsed"] is True


@pytest.mark.asyncio
async def test_groups_notes_reroutes_collapse_and_rename_on_the_canvas(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        # Rename: double-click the title, type, Enter. Typing the type's name back clears the title.
        await page.mouse_click(await page.centre("[data-testid=title-draw]"), count=2)
        await page.wait_for("document.querySelector('[data-testid=title-draw-input]') === document.activeElement",
                            what="the title box")
        await page.send("Input.insertText", text="Painter")
        await page.press("Enter", "Enter", 13)
        await page.wait_for(f"{graph_expression()}.ui.nodes.draw.title === 'Painter'", what="the title stored")

        # Collapse: the node shrinks to its title bar, its links stay.
        height = (await box(page, "[data-testid=node-save]"))[3]
        await page.click("[data-testid=collapse-save]")
        await page.wait_for(f"{graph_expression()}.ui.nodes.save.collapsed === true", what="collapsed stored")
        assert (await box(page, "[data-testid=node-save]"))[3] < height / 2
        assert await page.evaluate("document.querySelectorAll('.react-flow__edge').length") == 2

        # Group the seed and draw nodes (Ctrl+G), then move the group by its title: they move along, save does not.
        await select_node(page, "seed")
        await page.hold("Shift", True)
        await page.mouse_click(await page.centre("[data-testid=node-draw] .node-id"), modifiers=SHIFT)
        await page.hold("Shift", False)
        await page.wait_for("document.querySelectorAll('.react-flow__node-graph.selected').length === 2", what="two selected")
        await page.shortcut("g")
        await page.wait_for(f"{graph_expression()}.ui.groups?.length === 1", what="a group made")
        before = await graph(page)
        group = before["ui"]["groups"][0]
        gx, gy, gw, gh = group["bounds"]
        for node in ("seed", "draw"):
            x, y = before["ui"]["nodes"][node]["pos"]
            assert gx < x < gx + gw and gy < y < gy + gh, (node, group)
        title = await page.centre(f"[data-testid=group-{group['id']}] .frame-title")
        await page.drag(title, (title[0] + 120, title[1] + 90))
        await page.wait_for(f"{graph_expression()}.ui.groups[0].bounds[0] !== {gx}", what="the group moved")
        after = await graph(page)
        dx = after["ui"]["groups"][0]["bounds"][0] - gx
        dy = after["ui"]["groups"][0]["bounds"][1] - gy
        assert dx > 50 and dy > 30
        for node in ("seed", "draw"):
            assert after["ui"]["nodes"][node]["pos"] == [before["ui"]["nodes"][node]["pos"][0] + dx,
                                                         before["ui"]["nodes"][node]["pos"][1] + dy], node
        assert after["ui"]["nodes"]["save"]["pos"] == before["ui"]["nodes"]["save"]["pos"]
        # Undo puts the group and its nodes back in one step.
        await page.shortcut("z")
        await page.wait_for(f"{graph_expression()}.ui.groups[0].bounds[0] === {gx}", what="the move undone")
        assert (await graph(page))["ui"]["nodes"]["draw"]["pos"] == before["ui"]["nodes"]["draw"]["pos"]

        # A reroute point: double-click the link seed -> draw, then drag the point.
        await page.mouse_click(await point_on_link(page, "draw:seed"), count=2)
        await page.wait_for(f"{graph_expression()}.ui.reroutes?.length === 1", what="a reroute point")
        reroute = (await graph(page))["ui"]["reroutes"][0]
        assert reroute["to"] == {"node": "draw", "input": "seed"}
        dot = await page.centre(f"[data-testid=reroute-{reroute['id']}]")
        await page.drag(dot, (dot[0], dot[1] + 80))
        await page.wait_for(f"{graph_expression()}.ui.reroutes[0].pos[1] > {reroute['pos'][1] + 40}", what="the point moved")

        # A note from the search: typed in markdown, drawn when left.
        await page.mouse_click(await canvas_point(page, 0.2, 0.88), count=2)
        await search_and_add(page, "note", "@note")
        await page.wait_for("document.activeElement?.dataset.testid?.startsWith('note-edit-')", what="the note open for typing")
        await page.send("Input.insertText", text="## Tip\nUse a *low* step count.")
        await page.mouse_click(await canvas_point(page, 0.6, 0.05))
        await page.wait_for(f"{graph_expression()}.ui.notes?.[0]?.text === '## Tip\\nUse a *low* step count.'",
                            what="the note stored")
        note = (await graph(page))["ui"]["notes"][0]
        assert await page.evaluate(f"document.querySelector('[data-testid=note-{note['id']}] h2').textContent") == "Tip"
        assert await page.evaluate(f"document.querySelector('[data-testid=note-{note['id']}] em').textContent") == "low"
        assert set(note) == {"id", "text", "pos", "size"}


@pytest.mark.asyncio
async def test_deleting_a_link_takes_its_reroute_points(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        await new_canvas(page)
        await page.shortcut("z")  # the graph back
        await page.wait_for("document.querySelectorAll('.react-flow__edge').length === 2", what="the links back")
        await page.mouse_click(await point_on_link(page, "save:image"), count=2)
        await page.wait_for(f"{graph_expression()}.ui.reroutes?.length === 1", what="a reroute point")
        await select_node(page, "save")
        await page.press("Delete", "Delete", 46)
        await page.wait_for(f"!('save' in {graph_expression()}.nodes)", what="save deleted")
        assert "reroutes" not in (await graph(page))["ui"]
