"""End to end (issue 17, what users reach for): the canvas tools in headless Chromium against a real
server: the node search (double-click, ComfyUI names, Enter adds the first hit there), links let go in
empty space or pulled off an input, sockets lit while a link is dragged.

Needs the system Chromium and the built editor, as test_editor_e2e.py does.
"""

from __future__ import annotations

import json

import pytest

from _browser import Browser, Page
from _editor import get_json, open_editor

pytestmark = pytest.mark.slow

SEARCH = "[data-testid=node-search]"
SEARCH_INPUT = "[data-testid=node-search-input]"


def graph_expression() -> str:
    """The graph the editor keeps (local storage), as a document."""
    return "JSON.parse(localStorage.getItem('nodegraph.graph')).workflow"


async def graph(page: Page) -> dict:
    return await page.evaluate(graph_expression())


async def new_canvas(page: Page) -> None:
    await page.click("[data-testid=new]")
    await page.wait_for("document.querySelectorAll('.react-flow__node').length === 0", what="an empty canvas")


async def canvas_point(page: Page, fx: float, fy: float) -> tuple[float, float]:
    """A point of the canvas, as fractions of its width and height."""
    box = await page.evaluate("(() => { const r = document.querySelector('.react-flow__pane').getBoundingClientRect();"
                              " return [r.left, r.top, r.width, r.height]; })()")
    return box[0] + fx * box[2], box[1] + fy * box[3]


async def hits(page: Page) -> list[str]:
    """The node types the open search lists, in order."""
    return await page.evaluate("[...document.querySelectorAll('[data-testid^=search-hit-]')]"
                               ".map(e => e.dataset.testid.slice('search-hit-'.length))")


async def search_and_add(page: Page, text: str, expected_first: str) -> None:
    """Type into the open search, check the first hit, add it with Enter."""
    await page.wait_for(f"document.querySelector('{SEARCH_INPUT}') === document.activeElement", what="the search focused")
    await page.send("Input.insertText", text=text)
    await page.wait_for(f"document.querySelector('[data-testid^=search-hit-]')?.dataset.testid === 'search-hit-{expected_first}'",
                        what=f"{expected_first} first for {text!r}")
    await page.press("Enter", "Enter", 13)
    await page.wait_for(f"document.querySelector('{SEARCH}') === null", what="the search closed")


def socket(node: str, name: str, kind: str) -> str:
    return f".react-flow__handle.{kind}[data-nodeid={json.dumps(node)}][data-handleid={json.dumps(name)}]"


@pytest.mark.asyncio
async def test_double_click_opens_a_search_that_finds_comfyui_names_and_adds_the_node_there(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base, workflow=None)
        await new_canvas(page)
        spot = await canvas_point(page, 0.3, 0.3)
        await page.mouse_click(spot, count=2)
        await page.wait_for(f"document.querySelector('{SEARCH}') !== null", what="the search box")
        # Ranked by relevance over our names, display names, ComfyUI names and descriptions.
        for text, first in [("CLIPTextEncode", "TextEncode"), ("EmptyLatentImage", "EmptyLatent"),
                            ("LoraLoader", "LoadLora"), ("KSampler", "KSampler"), ("checkpoint", "LoadCheckpoint")]:
            await page.type_into(SEARCH_INPUT, text)
            await page.wait_for(f"document.querySelector('[data-testid^=search-hit-]')?.dataset.testid === 'search-hit-{first}'",
                                what=f"{first} first for {text!r}")
        assert (await page.evaluate("document.querySelector('[data-testid=search-hit-LoadCheckpoint] .hit-detail')"
                                    ".textContent")) == "CheckpointLoaderSimple"
        await page.type_into(SEARCH_INPUT, "CLIPTextEncode")
        await page.press("Enter", "Enter", 13)  # Enter adds the first hit
        await page.wait_for("document.querySelector('[data-testid=node-text_encode]') !== null", what="Text Encode added")
        await page.wait_for(f"document.querySelector('{SEARCH}') === null", what="the search closed")
        box = await page.evaluate("(() => { const r = document.querySelector('[data-testid=node-text_encode]')"
                                  ".getBoundingClientRect(); return [r.left, r.top]; })()")
        assert abs(box[0] - spot[0]) < 30 and abs(box[1] - spot[1]) < 40, (box, spot)  # where it was asked for
        # Escape closes the search without adding anything.
        await page.mouse_click(await canvas_point(page, 0.7, 0.6), count=2)
        await page.wait_for(f"document.querySelector('{SEARCH}') !== null", what="the search box again")
        await page.press("Escape", "Escape", 27)
        await page.wait_for(f"document.querySelector('{SEARCH}') === null", what="the search closed by Escape")
        assert list((await graph(page))["nodes"]) == ["text_encode"]

        # Nodes added by clicking the palette never stack on one spot.
        for _ in range(3):
            await page.click("[data-testid=palette-Integer]")
        await page.wait_for("document.querySelectorAll('.react-flow__node').length === 4", what="three Integers")
        positions = [tuple(node["pos"]) for node in (await graph(page))["ui"]["nodes"].values()]
        assert len(set(positions)) == 4, positions


@pytest.mark.asyncio
async def test_links_let_go_in_empty_space_open_the_search_for_their_type_and_can_be_pulled_off(picture_server, tmp_path):
    chromium, base = picture_server
    catalogue = get_json(f"{base}/api/nodes")
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base, workflow=None)
        await new_canvas(page)
        await page.mouse_click(await canvas_point(page, 0.1, 0.2), count=2)
        await search_and_add(page, "checkpoint", "LoadCheckpoint")

        # From an output: only nodes that take CLIP are offered; the chosen one is linked.
        await page.drag(await page.centre(socket("load_checkpoint", "clip", "source")), await canvas_point(page, 0.42, 0.15))
        await page.wait_for(f"document.querySelector('{SEARCH}') !== null", what="the search for a CLIP link")
        offered = await hits(page)
        takes_clip = {name for name, spec in catalogue["nodes"].items() if not spec["deprecated"]
                      and any(i["type"] in ("CLIP", "*") for i in spec["inputs"].values())}
        assert offered and set(offered) <= takes_clip and "TextEncode" in offered, offered
        await page.click("[data-testid=search-hit-TextEncode]")
        await page.wait_for("document.querySelector('[data-testid=node-text_encode]') !== null", what="Text Encode added")
        assert (await graph(page))["nodes"]["text_encode"]["inputs"]["clip"] == {"from": "load_checkpoint", "output": "clip"}

        # While a link is dragged, the sockets that can take it light up; the others are dimmed.
        await page.drag(await page.centre(socket("text_encode", "conditioning", "source")), await canvas_point(page, 0.75, 0.45))
        await search_and_add(page, "ksampler", "KSampler")
        sampler = (await graph(page))["nodes"]["ksampler"]["inputs"]
        assert sampler["positive"] == {"from": "text_encode", "output": "conditioning"}
        # The only MODEL output in the graph was linked too; the prompt was not also taken as the negative.
        assert sampler["model"] == {"from": "load_checkpoint", "output": "model"}
        assert "negative" not in sampler or not isinstance(sampler["negative"], dict)
        start = await page.centre(socket("load_checkpoint", "model", "source"))
        await page.send("Input.dispatchMouseEvent", type="mouseMoved", x=start[0], y=start[1])
        await page.send("Input.dispatchMouseEvent", type="mousePressed", x=start[0], y=start[1], button="left",
                        buttons=1, clickCount=1)
        for step in range(1, 6):
            await page.send("Input.dispatchMouseEvent", type="mouseMoved", x=start[0] + 20 * step, y=start[1] + 10 * step,
                            button="left", buttons=1)
        lit = "(s) => document.querySelector(s).classList.contains('compatible')"
        await page.wait_for(f"({lit})({json.dumps(socket('ksampler', 'model', 'target'))})", what="the MODEL input lit")
        assert not await page.evaluate(f"({lit})({json.dumps(socket('ksampler', 'positive', 'target'))})")
        assert await page.evaluate(f"document.querySelector({json.dumps(socket('ksampler', 'latent', 'target'))})"
                                   ".classList.contains('incompatible')")
        await page.send("Input.dispatchMouseEvent", type="mouseReleased", x=start[0] + 100, y=start[1] + 50,
                        button="left", buttons=0, clickCount=1)
        await page.press("Escape", "Escape", 27)

        # From an input: only nodes that give LATENT; the new node feeds it.
        await page.drag(await page.centre(socket("ksampler", "latent", "target")), await canvas_point(page, 0.45, 0.8))
        await page.wait_for(f"document.querySelector('{SEARCH}') !== null", what="the search for a LATENT input")
        gives_latent = {name for name, spec in catalogue["nodes"].items()
                        if any(o["type"] in ("LATENT", "*") for o in spec["outputs"].values())}
        offered = await hits(page)
        assert set(offered) <= gives_latent and "EmptyLatent" in offered, offered
        await page.click("[data-testid=search-hit-EmptyLatent]")
        await page.wait_for("document.querySelector('[data-testid=node-empty_latent]') !== null", what="Empty Latent added")
        document = await graph(page)
        assert document["nodes"]["ksampler"]["inputs"]["latent"] == {"from": "empty_latent", "output": "latent"}
        assert document["nodes"]["empty_latent"]["inputs"]["model"] == {"from": "load_checkpoint", "output": "model"}

        # A link pulled off an input moves: let go on another input's label, it joins that input.
        edges = "document.querySelectorAll('.react-flow__edge').length"
        count = await page.evaluate(edges)
        await page.drag(await page.centre(socket("ksampler", "positive", "target")),
                        await page.centre("[data-testid=node-ksampler] [data-testid=label-in-negative]"))
        await page.wait_for(f"{graph_expression()}.nodes.ksampler.inputs.negative?.from === 'text_encode'",
                            what="the link moved to negative")
        sampler = (await graph(page))["nodes"]["ksampler"]["inputs"]
        assert not isinstance(sampler.get("positive"), dict)
        assert await page.evaluate(edges) == count
        # Pulled off and let go in empty space: the search for a node that takes it; Escape leaves it off.
        await page.drag(await page.centre(socket("ksampler", "negative", "target")), await canvas_point(page, 0.55, 0.93))
        await page.wait_for(f"document.querySelector('{SEARCH}') !== null", what="the search for the pulled link")
        assert "KSampler" in await hits(page)
        await page.press("Escape", "Escape", 27)
        await page.wait_for(f"{edges} === {count - 1}", what="the pulled link gone")
        assert not isinstance((await graph(page))["nodes"]["ksampler"]["inputs"].get("negative"), dict)
        # Undo puts it back.
        await page.shortcut("z")
        await page.wait_for(f"{graph_expression()}.nodes.ksampler.inputs.negative?.from === 'text_encode'",
                            what="the link back after undo")


def node_selector(node: str) -> str:
    return f"[data-testid=node-{node}]"


async def select_node(page: Page, node: str) -> None:
    """Click a node's title bar, which selects it alone."""
    await page.mouse_click(await page.centre(f"{node_selector(node)} .node-title"))
    await page.wait_for(f"document.querySelector('.react-flow__node[data-id={json.dumps(node)}]')"
                        ".classList.contains('selected')", what=f"{node} selected")


@pytest.mark.asyncio
async def test_bypass_and_mute_are_kept_in_the_document_and_honoured_by_the_server(picture_server, tmp_path):
    """Ctrl+B bypasses the selected node, Ctrl+M mutes it (again: runs it again); drawn distinctly,
    written as the node's "mode"; a run on the server passes a bypassed node's input on, and refuses
    one that needs a muted node."""
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        # draw -> Invert Image -> save. The picture pack's pictures are not tensors: were Invert Image to
        # run, the run would fail; bypassed, save gets draw's picture as it is.
        await page.drag(await page.centre(socket("draw", "image", "source")), await canvas_point(page, 0.3, 0.8))
        await search_and_add(page, "invert image", "InvertImage")
        await page.drag(await page.centre(socket("invert_image", "image", "source")),
                        await page.centre(socket("save", "image", "target")))
        await page.wait_for(f"{graph_expression()}.nodes.save.inputs.image?.from === 'invert_image'",
                            what="save fed by Invert Image")

        await select_node(page, "invert_image")
        await page.shortcut("b")
        await page.wait_for(f"{graph_expression()}.nodes.invert_image.mode === 'bypass'", what="mode bypass stored")
        looks = await page.evaluate(f"(() => {{ const s = getComputedStyle(document.querySelector('{node_selector('invert_image')}'));"
                                    " return [s.borderTopStyle, s.opacity]; })()")
        assert looks[0] == "dashed" and float(looks[1]) < 1
        assert await page.evaluate(f"document.querySelector('[data-testid=mode-invert_image]').textContent") == "bypassed"
        await page.click("[data-testid=run]")
        await page.wait_for("document.querySelector('[data-testid=media-save][data-kind=image]') !== null",
                            timeout=60, what="the image made past the bypassed node")
        run = (get_json(f"{base}/api/runs"))["runs"][-1]
        assert run["status"] == "succeeded"
        assert get_json(f"{base}/api/runs/{run['id']}")["workflow"]["nodes"]["invert_image"]["mode"] == "bypass"
        assert "invert_image" not in get_json(f"{base}/api/runs/{run['id']}")["nodes"]  # it never ran

        await page.shortcut("m")  # bypassed -> muted
        await page.wait_for(f"{graph_expression()}.nodes.invert_image.mode === 'mute'", what="mode mute stored")
        assert float(await page.evaluate(f"getComputedStyle(document.querySelector('{node_selector('invert_image')}')).opacity")) < 0.6
        await page.shortcut("m")  # muted -> runs
        await page.wait_for(f"!('mode' in {graph_expression()}.nodes.invert_image)", what="mode gone")
        assert await page.evaluate("document.querySelector('[data-testid=mode-invert_image]')") is None
        await page.shortcut("m")
        await page.wait_for(f"{graph_expression()}.nodes.invert_image.mode === 'mute'", what="muted again")
        runs_before = len(get_json(f"{base}/api/runs")["runs"])
        await page.click("[data-testid=run]")
        issue = await page.wait_for("document.querySelector('[data-testid=issue-save-image]')?.textContent",
                                    what="the save node's input fed by a muted node")
        assert "muted" in issue
        assert len(get_json(f"{base}/api/runs")["runs"]) == runs_before
