"""Bypassed and muted nodes through the HTTP API: the same document runs as from the CLI."""

from __future__ import annotations

import copy

import pytest

from _server_fixtures import SUM, counting_pack, make_client, registry, submit, wait_status  # noqa: F401


@pytest.mark.asyncio
async def test_bypassed_node_passes_through_and_muted_feed_is_refused(make_client):
    client = await make_client()
    bypassed = copy.deepcopy(SUM)
    bypassed["nodes"]["b"]["mode"] = "bypass"  # b adds 3 to a's 2
    run = await wait_status(client, await submit(client, bypassed), ("succeeded", "failed"))
    assert run["status"] == "succeeded"
    assert {n: s["status"] for n, s in run["nodes"].items()} == {"a": "executed", "out": "executed"}
    assert counting_pack.RUNS == {"a": 1, "out": 1}
    assert run["workflow"]["nodes"]["b"]["mode"] == "bypass"  # kept as submitted

    muted = copy.deepcopy(SUM)
    muted["nodes"]["a"]["mode"] = "mute"
    response = await client.post("/api/runs", json={"workflow": muted})
    assert response.status == 400
    [issue] = (await response.json())["issues"]
    assert (issue["code"], issue["node_id"], issue["input"], issue["details"]["muted"]) == ("muted_source", "b", "a", "a")

    response = await client.post("/api/runs", json={"workflow": {**SUM, "nodes": {
        **SUM["nodes"], "b": {**SUM["nodes"]["b"], "mode": "off"}}}})
    [issue] = (await response.json())["issues"]
    assert response.status == 400 and (issue["code"], issue["node_id"]) == ("invalid_mode", "b")
