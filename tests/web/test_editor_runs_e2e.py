"""End to end (issue 17): output images and past runs in headless Chromium against a real server: the
image viewer (large, a batch stepped through, download, the workflow that made it), the history
panel, and queueing several runs at once.
"""

from __future__ import annotations

import json

import pytest

from _browser import Browser
from _editor import get_bytes, get_json, http_status, open_editor
from test_editor_canvas_e2e import canvas_point, graph, graph_expression, search_and_add, socket

pytestmark = pytest.mark.slow


@pytest.mark.asyncio
async def test_the_image_viewer_steps_through_a_batch_downloads_and_opens_the_workflow(picture_server, tmp_path):
    chromium, base = picture_server
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        # A second save node: the run makes two images.
        await page.drag(await page.centre(socket("draw", "image", "source")), await canvas_point(page, 0.45, 0.85))
        await search_and_add(page, "save picture", "SavePicture")
        await page.click("[data-testid=run]")
        run_id = await page.wait_for(
            "(() => { const r = document.querySelector('[data-testid^=run-][data-status=succeeded]');"
            " return r && r.querySelectorAll('img').length === 2 ? r.dataset.testid.slice(4) : null; })()",
            timeout=60, what="a finished run with two images")

        # The image on a node opens large.
        await page.wait_for("document.querySelector('[data-testid=media-save][data-kind=image]') !== null", what="save's image")
        await page.click("[data-testid=media-save]")
        await page.wait_for("document.querySelector('[data-testid=viewer]') !== null", what="the viewer")
        assert await page.evaluate("document.querySelector('[data-testid=viewer-count]').textContent") == "1 / 1"
        size = await page.evaluate("(() => { const i = document.querySelector('[data-testid=viewer-image]');"
                                   " return [i.getBoundingClientRect().width, i.naturalWidth]; })()")
        assert size[0] >= 256  # shown at least at its own size (256 wide), large next to the node's
        await page.press("Escape", "Escape", 27)
        await page.wait_for("document.querySelector('[data-testid=viewer]') === null", what="the viewer closed")

        # The run's images from the queue panel: step through them with the arrow keys (wrapping).
        await page.click(f"[data-testid=run-image-{run_id}-0]")
        await page.wait_for("document.querySelector('[data-testid=viewer-count]')?.textContent === '1 / 2'", what="1 of 2")
        first = await page.evaluate("document.querySelector('[data-testid=viewer-image]').getAttribute('src')")
        await page.press("ArrowRight", "ArrowRight", 39)
        await page.wait_for("document.querySelector('[data-testid=viewer-count]').textContent === '2 / 2'", what="2 of 2")
        second = await page.evaluate("document.querySelector('[data-testid=viewer-image]').getAttribute('src')")
        assert second != first
        await page.click("[data-testid=viewer-next]")
        await page.wait_for("document.querySelector('[data-testid=viewer-count]').textContent === '1 / 2'", what="wrapped")
        # Download: the link names the file and fetches the PNG.
        link = await page.evaluate("(() => { const a = document.querySelector('[data-testid=viewer-download]');"
                                   " return [a.getAttribute('href'), a.getAttribute('download')]; })()")
        assert link[0] == first and link[1] == first.rsplit("/", 1)[-1]
        assert get_bytes(f"{base}{link[0]}")[:8] == b"\x89PNG\r\n\x1a\n"

        # The workflow that made it, opened in a new tab: the graph on the canvas, changed since and not
        # saved, is not replaced.
        await page.press("Escape", "Escape", 27)
        await page.type_into("[data-testid=input-draw-prompt]", "changed after the run")
        await page.evaluate("document.activeElement?.blur()")
        await page.mouse_click(await page.centre(f"[data-testid=run-image-{run_id}-1]"))
        await page.wait_for("document.querySelector('[data-testid=viewer-count]')?.textContent === '2 / 2'", what="2 of 2")
        await page.mouse_click(await page.centre("[data-testid=viewer-workflow]"))
        await page.wait_for("document.querySelectorAll('[data-testid=tabs] .tab').length === 2", what="a second tab")
        await page.wait_for("document.querySelector('[data-testid=tab-1]').classList.contains('active')", what="it open")
        assert await page.evaluate("document.querySelector('[data-testid=viewer]')") is None
        ran = get_json(f"{base}/api/runs/{run_id}")["workflow"]
        await page.wait_for(f"{graph_expression()}.nodes.draw?.inputs.prompt === {json.dumps(ran['nodes']['draw']['inputs']['prompt'])}",
                            what="the run's workflow")
        opened = await graph(page)
        assert opened["nodes"] == ran["nodes"]
        assert json.dumps(sorted(opened["nodes"])) == json.dumps(["draw", "save", "save_picture", "seed"])
        await page.mouse_click(await page.centre("[data-testid=tab-0] .tab-name"))
        await page.wait_for("document.querySelector('[data-testid=tab-0]').classList.contains('active')", what="tab 0 open")
        assert (await graph(page))["nodes"]["draw"]["inputs"]["prompt"] == "changed after the run"


@pytest.mark.asyncio
async def test_history_survives_a_reload_reopens_a_run_and_deletes_runs_and_run_queues_a_batch(picture_server, tmp_path):
    chromium, base = picture_server
    before = {run["id"] for run in get_json(f"{base}/api/runs")["runs"]}
    async with Browser(chromium, tmp_path / "profile") as page:
        await open_editor(page, base)
        prompt = "three green squares"
        await page.type_into("[data-testid=input-draw-prompt]", prompt)
        await page.type_into("[data-testid=batch-count]", "3")
        assert "×3" in await page.evaluate("document.querySelector('[data-testid=run]').textContent")
        await page.click("[data-testid=run]")
        new = "(() => { const seen = new Set(%s); return [...document.querySelectorAll('[data-testid=history] [data-status=succeeded]')]" \
              ".map(e => e.dataset.testid.slice(4)).filter(id => !seen.has(id)); })()" % json.dumps(sorted(before))
        await page.wait_for(f"{new}.length === 3", timeout=90, what="three runs from one click, finished")
        ids = await page.evaluate(new)
        assert {run["id"] for run in get_json(f"{base}/api/runs")["runs"]} - before == set(ids)

        async def entry(run: str) -> dict:
            return await page.evaluate(
                f"(() => {{ const e = document.querySelector('[data-testid=history] [data-testid=run-{run}]');"
                " return e && { prompt: e.querySelector('.run-prompt')?.textContent, time: e.querySelector('.run-time').textContent,"
                " images: e.querySelectorAll('.run-images img').length }; })()")

        for run in ids:
            await page.wait_for(f"document.querySelector('[data-testid=run-prompt-{run}]')?.textContent === {json.dumps(prompt)}",
                                what="the run's prompt")
            shown = await entry(run)
            assert shown["images"] == 1 and len(shown["time"]) == 5 and shown["time"][2] == ":", shown

        # After a reload the history is read from the server again, prompts and thumbnails included.
        await page.send("Page.reload")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to restart")
        for run in ids:
            await page.wait_for(f"document.querySelector('[data-testid=run-prompt-{run}]')?.textContent === {json.dumps(prompt)}",
                                what="the run's prompt after the reload")
            assert (await entry(run))["images"] == 1
        # The prompts came with the list of runs (GET /api/runs), not one request per run.
        fetched = await page.evaluate("performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
        assert "/api/runs" in fetched and not [path for path in fetched if path.startswith("/api/runs/")], fetched

        # One click reopens a run's workflow, in a new tab: the graph open, changed before the reload and
        # not saved, stays as it was in its own tab.
        await page.type_into("[data-testid=input-draw-prompt]", "changed, not saved")
        await page.evaluate("document.activeElement?.blur()")
        await page.send("Page.reload")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to restart")
        await page.wait_for("document.querySelector('[data-testid=tab-0] .tab-edited') !== null", what="the tab marked changed")
        tabs = await page.evaluate("document.querySelectorAll('[data-testid=tabs] .tab').length")
        await page.mouse_click(await page.centre(f"[data-testid=history-open-{ids[0]}]"))
        await page.wait_for(f"document.querySelectorAll('[data-testid=tabs] .tab').length === {tabs + 1}", what="a new tab")
        await page.wait_for(f"{graph_expression()}.nodes.draw?.inputs.prompt === {json.dumps(prompt)}", what="the run's workflow")
        await page.mouse_click(await page.centre("[data-testid=tab-0] .tab-name"))
        await page.wait_for("document.querySelector('[data-testid=tab-0]').classList.contains('active')", what="tab 0 open")
        assert (await graph(page))["nodes"]["draw"]["inputs"]["prompt"] == "changed, not saved"

        # Deleted from the server's history: off the list, out of GET /api/runs, its image file kept.
        image = get_json(f"{base}/api/runs/{ids[1]}")["file_urls"][0]
        await page.mouse_click(await page.centre(f"[data-testid=history-delete-{ids[1]}]"))
        await page.wait_for(f"document.querySelector('[data-testid=history] [data-testid=run-{ids[1]}]') === null",
                            what="the run off the list")
        await page.wait_for(f"document.querySelector('[data-testid=history] [data-testid=run-{ids[0]}]') !== null",
                            what="the other runs still listed")
        assert ids[1] not in {run["id"] for run in get_json(f"{base}/api/runs")["runs"]}
        assert http_status(f"{base}/api/runs/{ids[1]}") == 404
        assert http_status(f"{base}{image}") == 200
        # Deleted by another client (another tab, a script): this page's list follows its run_deleted event.
        assert http_status(f"{base}/api/runs/{ids[2]}", "DELETE") == 200
        await page.wait_for(f"document.querySelector('[data-testid=history] [data-testid=run-{ids[2]}]') === null",
                            what="another client's deletion shown")
        # Both stay gone after a reload.
        await page.send("Page.reload")
        await page.wait_for("document.querySelector('.editor[data-ready=true]') !== null", what="the editor to restart")
        await page.wait_for(f"document.querySelector('[data-testid=history] [data-testid=run-{ids[0]}]') !== null",
                            what="the history back")
        for gone in ids[1:]:
            assert await page.evaluate(f"document.querySelector('[data-testid=history] [data-testid=run-{gone}]')") is None
