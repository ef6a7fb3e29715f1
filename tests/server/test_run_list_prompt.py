"""GET /api/runs carries each run's prompt (read from the workflow the run record already holds), so a
history of runs needs no request per run; GET /api/runs/{id} carries the same."""

from __future__ import annotations

import pytest

from _server_fixtures import PICTURE_PACK_DIR, counting_pack, link, make_client_factory, submit, wait_status
from nodegraph.plugins import build_registry


def picture(prompt: str | None = None, **more: object) -> dict:
    inputs = {"steps": 1, "width": 16, "height": 16, **more}
    if prompt is not None:
        inputs["prompt"] = prompt
    return {"type": "PromptPicture", "inputs": inputs}


SAVE = {"type": "SavePicture", "inputs": {"image": link("main", "image")}}


@pytest.mark.asyncio
async def test_the_run_list_carries_each_runs_prompt(aiohttp_client, tmp_path):
    registry, problems = build_registry([PICTURE_PACK_DIR], entry_points=False)
    assert problems == []
    registry.add_pack("counting", counting_pack.NODES)
    client = await make_client_factory(aiohttp_client, registry, tmp_path)()
    workflows = {
        # A blank multi-line text is passed over: the first non-empty one, in node order, is the prompt.
        "second": {"version": 1, "nodes": {"blank": picture("   "), "main": picture("a green square"),
                                           "later": picture("not this one"), "save": SAVE}},
        # Left out: the default the run used.
        "default": {"version": 1, "nodes": {"main": picture(), "save": SAVE}},
        # No multi-line text at all.
        "none": {"version": 1, "nodes": {"a": {"type": "Value", "inputs": {"value": 2}},
                                         "out": {"type": "Sink", "inputs": {"value": link("a", "value")}}}},
    }
    ids = {name: await submit(client, workflow) for name, workflow in workflows.items()}
    for run_id in ids.values():
        await wait_status(client, run_id, ("succeeded",))
    expected = {ids["second"]: "a green square", ids["default"]: "a red circle", ids["none"]: None}

    listed = (await (await client.get("/api/runs")).json())["runs"]
    assert {run["id"]: run["prompt"] for run in listed} == expected
    assert all("workflow" not in run for run in listed)
    newest = (await (await client.get("/api/runs?limit=1")).json())["runs"]
    assert [(run["id"], run["prompt"]) for run in newest] == [(ids["none"], None)]
    for run_id, prompt in expected.items():
        run = await (await client.get(f"/api/runs/{run_id}")).json()
        assert run["prompt"] == prompt and run["workflow"]["nodes"]
