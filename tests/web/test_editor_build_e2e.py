"""End to end (issue 17, Must show): the txt2img graph built from an empty canvas in at most 20 user
actions, then run on the embedded tiny-shapes model until its image arrives; headless Chromium at
1600x1000 against a real server with the diffusion nodes.

Every action is counted as a user makes it: a click, a key press and a drag count 1 each, typing one
text counts 1. Pointing (moving the mouse without a button) is not an action. The server offers the
repository's other workflows (not txt2img.json): the search puts the node types they use most first,
as it would for a user with those files. The screenshots docs/editor.png and docs/editor-running.png
come from this test (in $NODEGRAPH_ARTIFACTS).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from _browser import Browser, Page
from _editor import EDITOR_DIR, ROOT, get_bytes, get_json, need, start_server, stop
from _browser import find_chromium

pytestmark = pytest.mark.slow

MAX_ACTIONS = 20
PROMPT = "a red circle on a blue background"


class User:
    """Acts on the page as a user does, counting each action."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.actions: list[str] = []

    async def point(self, x: float, y: float) -> None:
        await self.page.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    async def click(self, selector: str, what: str) -> None:
        await self.page.mouse_click(await self.page.centre(selector))
        self.actions.append(f"click {what}")

    async def drag(self, start: tuple[float, float], end: tuple[float, float], what: str) -> None:
        await self.page.drag(start, end)
        self.actions.append(f"drag {what}")

    async def type(self, text: str, what: str) -> None:
        """Type a text key by key (each key a real key event, so typing on the canvas opens the search)."""
        for character in text:
            for kind in ("keyDown", "keyUp"):
                await self.page.send("Input.dispatchKeyEvent", type=kind, key=character, text=character if kind == "keyDown" else "",
                                     code=f"Key{character.upper()}" if character.isalpha() else "",
                                     windowsVirtualKeyCode=ord(character.upper()))
        self.actions.append(f"type {what}")

    async def press(self, key: str, code: str, key_code: int, what: str) -> None:
        await self.page.press(key, code, key_code)
        self.actions.append(f"press {what}")

    async def pick(self, node_type: str) -> None:
        """Click a hit of the open search that is in view (no scrolling needed)."""
        hit = f"[data-testid=search-hit-{node_type}]"
        await self.page.wait_for(f"document.querySelector('{hit}') !== null", what=f"{node_type} offered")
        in_view = await self.page.evaluate(
            f"(() => {{ const h = document.querySelector('{hit}').getBoundingClientRect();"
            " const l = document.querySelector('[data-testid=node-search-hits]').getBoundingClientRect();"
            " return h.top >= l.top && h.bottom <= l.bottom; })()")
        assert in_view, f"{node_type} is not in view in the search list"
        await self.click(hit, f"search hit {node_type}")
        await self.page.wait_for("document.querySelector('[data-testid=node-search]') === null", what="the search closed")


def socket(node: str, name: str, kind: str) -> str:
    return f".react-flow__handle.{kind}[data-nodeid={json.dumps(node)}][data-handleid={json.dumps(name)}]"


@pytest.fixture
def diffusion_server(tmp_path):
    chromium = find_chromium()
    need(chromium is not None, "no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    need((EDITOR_DIR / "index.html").is_file(), "the editor is not built (npm ci && npm run build in web/)")
    need((ROOT / "models" / "checkpoints" / "tiny-shapes.safetensors").is_file(), "the embedded model is missing")
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    for path in (ROOT / "workflows").glob("*.json"):
        if path.name != "txt2img.json":
            shutil.copy(path, workflows / path.name)
    base, process = start_server(tmp_path, workflows, None)
    yield chromium, base
    stop(process)


@pytest.mark.asyncio
async def test_build_txt2img_from_an_empty_canvas_in_at_most_20_actions_and_run_it(diffusion_server, tmp_path):
    chromium, base = diffusion_server
    artifacts = Path(os.environ.get("NODEGRAPH_ARTIFACTS") or tmp_path / "artifacts")
    async with Browser(chromium, tmp_path / "profile", width=1600, height=1000) as page:
        await page.goto(f"{base}/")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to start")
        assert await page.evaluate("document.querySelectorAll('.react-flow__node').length") == 0  # an empty canvas
        pane = await page.evaluate("(() => { const r = document.querySelector('.react-flow__pane').getBoundingClientRect();"
                                   " return [r.left, r.top]; })()")

        def at(x: float, y: float) -> tuple[float, float]:
            return pane[0] + x, pane[1] + y

        async def centre(selector: str) -> tuple[float, float]:
            return await page.centre(selector)

        user = User(page)
        # The checkpoint loader: typed on the canvas where the pointer is, the first hit taken with Enter.
        await user.point(*at(20, 90))
        await user.type("checkpoint", "'checkpoint' on the canvas (opens the search)")
        await page.wait_for("document.querySelector('[data-testid^=search-hit-]')?.dataset.testid === 'search-hit-LoadCheckpoint'",
                            what="Load Checkpoint first")
        await user.press("Enter", "Enter", 13, "Enter")
        await page.wait_for("document.querySelector('[data-testid=node-load_checkpoint]') !== null", what="the loader")

        # The prompt: a link from the loader's CLIP into empty space offers the text encoder.
        await user.drag(await centre(socket("load_checkpoint", "clip", "source")), at(300, 80), "CLIP into empty space")
        await user.pick("TextEncode")
        await user.click("[data-testid=input-text_encode-text]", "the prompt box")
        await page.send("Input.insertText", text=PROMPT)
        user.actions.append("type the prompt")

        # The sampler from the prompt's conditioning (its model is linked: the only MODEL output).
        await user.drag(await centre(socket("text_encode", "conditioning", "source")), at(580, 80), "CONDITIONING into empty space")
        await user.pick("KSampler")
        # The negative prompt and the empty latent, from the sampler's inputs.
        await user.drag(await centre(socket("ksampler", "negative", "target")), at(540, 300), "negative into empty space")
        await user.pick("TextEncode")
        await user.drag(await centre(socket("ksampler", "latent", "target")), at(540, 490), "latent into empty space")
        await user.pick("EmptyLatent")
        # The embedded model is trained at 64 x 64.
        await user.click("[data-testid=input-empty_latent-width]", "the width")
        await page.send("Input.insertText", text="64")
        user.actions.append("type 64")
        await user.press("Tab", "Tab", 9, "Tab")
        await page.send("Input.insertText", text="64")
        user.actions.append("type 64")
        # Decode and save, from the sampler's output on.
        await user.drag(await centre(socket("ksampler", "latent", "source")), at(860, 80), "LATENT into empty space")
        await user.pick("VAEDecode")
        await user.drag(await centre(socket("vae_decode", "image", "source")), at(860, 220), "IMAGE into empty space")
        await user.pick("SaveImage")

        built = len(user.actions)
        print("\n".join(f"{n + 1:2}. {action}" for n, action in enumerate(user.actions)))
        assert built <= MAX_ACTIONS, user.actions

        workflow = json.loads(await page.evaluate("JSON.stringify(JSON.parse(localStorage.getItem('nodegraph.graph')).workflow)"))
        nodes = workflow["nodes"]
        link = lambda node, output: {"from": node, "output": output}  # noqa: E731
        assert {name: node["type"] for name, node in nodes.items()} == {
            "load_checkpoint": "LoadCheckpoint", "text_encode": "TextEncode", "ksampler": "KSampler",
            "text_encode_2": "TextEncode", "empty_latent": "EmptyLatent", "vae_decode": "VAEDecode", "save_image": "SaveImage"}
        assert nodes["load_checkpoint"]["inputs"]["name"] == "tiny-shapes.safetensors"
        assert nodes["text_encode"]["inputs"] == {"clip": link("load_checkpoint", "clip"), "text": PROMPT}
        assert nodes["text_encode_2"]["inputs"]["clip"] == link("load_checkpoint", "clip")
        sampler = nodes["ksampler"]["inputs"]
        assert (sampler["model"], sampler["positive"], sampler["negative"], sampler["latent"]) == (
            link("load_checkpoint", "model"), link("text_encode", "conditioning"), link("text_encode_2", "conditioning"),
            link("empty_latent", "latent"))
        latent = nodes["empty_latent"]["inputs"]
        assert (latent["model"], latent["width"], latent["height"]) == (link("load_checkpoint", "model"), 64, 64)
        assert nodes["vae_decode"]["inputs"] == {"vae": link("load_checkpoint", "vae"), "latent": link("ksampler", "latent")}
        assert nodes["save_image"]["inputs"]["images"] == link("vae_decode", "image")

        # Run it (one more click) on the embedded model: the image arrives on the save node.
        await user.click("[data-testid=run]", "Run")
        src = await page.wait_for(
            "(() => { const i = document.querySelector('[data-testid=media-save_image][data-kind=image]');"
            " return i && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null; })()",
            timeout=240, what="the generated image")
        image = Image.open(io.BytesIO(get_bytes(f"{base}{src}"))).convert("RGB")
        assert image.size == (64, 64)
        low, high = zip(*image.getextrema())
        assert max(h - lo for lo, h in zip(low, high)) > 30, "a flat image"
        await page.wait_for("document.querySelector('[data-testid=history] [data-status=succeeded]') !== null",
                            what="the run in the history")
        await page.evaluate("document.activeElement?.blur()")
        await page.screenshot(artifacts / "editor.png")
        print(f"built in {built} actions, {len(user.actions)} with Run")

        # Mid-run, with the sampler's step preview: a longer run of the same graph, screenshot, then cancelled.
        await page.type_into("[data-testid=input-ksampler-steps]", "400")
        await page.evaluate("document.activeElement.blur()")
        await page.click("[data-testid=run]")
        await page.wait_for("document.querySelector('[data-testid=node-ksampler][data-status=running]') !== null"
                            " && document.querySelector('[data-testid=media-ksampler][data-kind=preview]') !== null"
                            " && Number(document.querySelector('[data-testid=progress-ksampler] > div')?.style.width.replace('%', '')) >= 2",
                            timeout=120, what="the sampler running, with a step preview")
        await page.screenshot(artifacts / "editor-running.png")
        assert await page.evaluate("document.querySelector('[data-testid=node-ksampler]').dataset.status") == "running"
        running = get_json(f"{base}/api/runs")["running"]
        assert running is not None
        await page.click(f"[data-testid=run-{running}] button[title=cancel]")
        await page.wait_for(f"document.querySelector('[data-testid=run-{running}]')?.dataset.status === 'cancelled'",
                            timeout=60, what="the long run cancelled")
