"""The malformed and hostile requests of issue 16, each answered with a 4xx JSON error naming the
problem: never a 500, never a plain-text page, and the server goes on serving."""

from __future__ import annotations

import json
import socket

import pytest

from _server_fixtures import SUM, counting_pack, counting_registry, doc, link, make_client_factory, submit, wait_status


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def body_of(workflow_text: str) -> bytes:
    return ('{"workflow": ' + workflow_text + "}").encode()


RUN_BODIES = {
    "invalid UTF-8": (b'{"workflow": {"nodes": {"\xff\xfe": 1}}}', 400, "bad_json", "not UTF-8"),
    "latin-1 text": ('{"workflow": {"version": 1, "nodes": {"caf\xe9": {"type": "Sink"}}}}'.encode("latin-1"),
                     400, "bad_json", "not UTF-8"),
    "5,000-digit integer": (body_of(json.dumps(doc(v=("Count", {"value": 0}))).replace("0}", "9" * 5000 + "}")),
                            400, "bad_json", "number is too long"),
    "arrays 2,000 deep": (body_of(nested(2000)), 400, "bad_json", "nested too deeply"),
    "arrays 100,000 deep": (body_of(nested(100_000)), 400, "bad_json", "nested too deeply"),
    "NaN": (body_of('{"version": 1, "nodes": {"v": {"type": "Sink", "inputs": {"value": NaN}}}}'),
            400, "bad_json", "NaN is not a JSON number"),
    "1e400": (body_of('{"version": 1, "nodes": {"v": {"type": "Sink", "inputs": {"value": 1e400}}}}'),
              400, "bad_json", "out of range"),
    "lone surrogate in a text input": (body_of(json.dumps(doc(v=("Sink", {"value": "\ud800"})))),
                                       400, "invalid_workflow", "lone surrogate"),
    "ui block 900 deep": (body_of('{"version": 1, "nodes": {"v": {"type": "Sink"}}, "ui": {"a": ' + nested(900) + "}}"),
                          400, "invalid_workflow", "nested more than 64 levels deep"),
    "not an object": (b"[1, 2]", 400, "bad_request", "expected"),
    "empty body": (b"", 400, "bad_json", "Expecting value"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(RUN_BODIES))
async def test_malformed_run_submissions_are_4xx_json(make_client, case):
    body, status, code, message = RUN_BODIES[case]
    client = await make_client()
    response = await client.post("/api/runs", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status and response.content_type == "application/json"
    answer = await response.json()
    assert answer["error"] == code and message in answer["message"] + json.dumps(answer.get("issues")), answer
    assert (await (await client.get("/api/runs")).json())["runs"] == []  # nothing queued
    assert counting_pack.RUNS == {}


@pytest.mark.asyncio
async def test_refused_documents_never_reach_the_executor_and_are_never_echoed_as_nan(make_client):
    client = await make_client()
    run_id = await submit(client, doc(v=("Sink", {"value": 1.5})))
    assert (await wait_status(client, run_id, ("succeeded",)))["status"] == "succeeded"
    for workflow in (doc(v=("Sink", {"value": float("nan")})), {**doc(v=("Sink", {})), "ui": {"zoom": float("inf")}}):
        response = await client.post("/api/runs", data=json.dumps({"workflow": workflow}),
                                     headers={"Content-Type": "application/json"})
        assert response.status == 400
    listed = await client.get("/api/runs")
    json.loads(await listed.text(), parse_constant=lambda name: pytest.fail(f"{name} in a response"))


@pytest.mark.asyncio
@pytest.mark.parametrize("query", ["limit=\u00b2", "limit=-1", "limit=1.5", "limit=" + "9" * 50, "limit=%ff"])
async def test_bad_limit_is_400(make_client, query):
    client = await make_client()
    response = await client.get(f"/api/runs?{query}")
    assert response.status == 400 and (await response.json())["error"] == "bad_request"


UPLOADS = {
    "no boundary": (b"--x\r\n", "multipart/form-data", 400, "multipart"),
    "garbage body": (b"\x00\xff garbage, no parts at all", "multipart/form-data; boundary=XYZ", 400, "multipart"),
    "no file field": (b"--XYZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nabc\r\n--XYZ--\r\n",
                      "multipart/form-data; boundary=XYZ", 400, "no field named 'file'"),
    "truncated part": (b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                       "multipart/form-data; boundary=XYZ", 415, "not a readable image"),
    "not multipart": (b"{}", "application/json", 400, "multipart"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(UPLOADS))
async def test_malformed_multipart_uploads_are_4xx_json(make_client, case):
    body, content_type, status, message = UPLOADS[case]
    client = await make_client()
    response = await client.post("/api/files/inputs", data=body, headers={"Content-Type": content_type})
    assert response.status == status and response.content_type == "application/json"
    assert message in (await response.json())["message"]


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.asyncio
@pytest.mark.parametrize("filename, stored", [
    (b"a\x00b.png", None), (b"a\x01b.png", None), (b"x" * 5000 + b".png", "x" * 116 + ".png"), (b"\xed\xa0\x80.png", "png.png"),
    (b"../../../etc/passwd", "passwd.png"), (b"%00%2e%2e%2fup.png", "up.png"), (b"\xff\xfe.png", "png.png"),
])
async def test_hostile_upload_file_names_are_cleaned(make_client, tmp_path, filename, stored):
    """Names as raw bytes in Content-Disposition: NUL, 5,000 characters, an encoded surrogate, paths.
    A control character makes the part's header invalid: the whole upload is refused."""
    body = (b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename +
            b"\"\r\nContent-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--XYZ--\r\n")
    client = await make_client()
    response = await client.post("/api/files/inputs", data=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=XYZ"})
    if stored is None:
        assert response.status == 400 and "multipart" in (await response.json())["message"]
        return
    assert response.status == 201, await response.text()
    name = (await response.json())["name"]
    assert name == stored
    assert (tmp_path / "inputs" / name).read_bytes() == png_bytes()


@pytest.mark.asyncio
async def test_long_workflow_names_are_400(make_client):
    client = await make_client()
    name = "w" * 300 + ".json"
    assert (await client.get(f"/api/workflows/{name}")).status == 400
    response = await client.put(f"/api/workflows/{name}", json=doc(v=("Sink", {})))
    assert response.status == 400 and "at most 120 characters" in (await response.json())["message"]
    response = await client.get("/api/files/outputs/" + "d" * 5000)
    assert response.status in (403, 404) and response.content_type == "application/json"


@pytest.mark.asyncio
async def test_saved_workflows_refuse_non_standard_json(make_client, tmp_path):
    client = await make_client()
    for text in ('{"version": 1, "nodes": {}, "ui": {"zoom": NaN}}', '{"nodes": {"a": ' + nested(500) + "}}"):
        response = await client.put("/api/workflows/bad.json", data=text, headers={"Content-Type": "application/json"})
        assert response.status == 400 and (await response.json())["error"] == "bad_json"
    assert not (tmp_path / "workflows" / "bad.json").exists()
    # A file written by hand with NaN is not echoed as non-standard JSON either.
    (tmp_path / "workflows").mkdir(exist_ok=True)
    (tmp_path / "workflows" / "hand.json").write_text('{"version": 1, "nodes": {}, "ui": {"zoom": NaN}}')
    response = await client.get("/api/workflows/hand.json")
    assert response.status == 422 and "NaN" in (await response.json())["message"]


@pytest.mark.asyncio
async def test_cancelling_a_finished_run_is_409_run_finished(make_client):
    client = await make_client()
    run_id = await submit(client, SUM)
    await wait_status(client, run_id, ("succeeded",))
    response = await client.post(f"/api/runs/{run_id}/cancel")
    assert response.status == 409
    assert (await response.json()) == {"error": "run_finished", "message": f"run {run_id} already ended: succeeded",
                                       "status": "succeeded"}


@pytest.mark.asyncio
async def test_unknown_routes_and_methods_are_json_errors(make_client):
    client = await make_client()
    response = await client.get("/api/no-such-route")
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await client.delete("/api/runs")
    assert response.status == 405 and (await response.json())["error"] == "method_not_allowed"


@pytest.mark.asyncio
@pytest.mark.parametrize("host, status, code", [
    ("evil.example@127.0.0.1", 400, "bad_host"), ("127.0.0.1@evil.example", 400, "bad_host"),
    ("127.0.0.1/x", 400, "bad_host"), ("127.0.0.1:80:80", 400, "bad_host"), ("evil.example", 403, "forbidden_host"),
    ("localhost.evil.example", 403, "forbidden_host"),
])
async def test_host_headers_with_userinfo_or_foreign_names_are_refused(make_client, host, status, code):
    client = await make_client()
    response = await client.post("/api/runs", json={"workflow": SUM}, headers={"Host": host})
    assert response.status == status and (await response.json())["error"] == code
    assert (await (await client.get("/api/runs")).json())["runs"] == []


def test_request_without_a_host_header_is_refused(live_server):
    # HTTP/1.1 requires Host: aiohttp's parser refuses it before any handler; HTTP/1.0 reaches ours.
    for request, message in ((b"GET /api/health HTTP/1.1\r\nConnection: close\r\n\r\n", b"Missing 'Host' header"),
                             (b"GET /api/health HTTP/1.0\r\n\r\n", b'"error": "missing_host"')):
        with socket.create_connection(("127.0.0.1", live_server.port), timeout=30) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400" and message in body, answer
    status, _, _ = live_server.request("GET", "/api/health")
    assert status == 200


@pytest.mark.asyncio
async def test_hidden_files_are_not_served_through_a_visible_symlink(make_client, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".secret").write_text("hidden")
    (out / "visible.txt").symlink_to(out / ".secret")
    (tmp_path / "elsewhere.txt").write_text("outside")
    (out / "outside.txt").symlink_to(tmp_path / "elsewhere.txt")
    (out / "plain.txt").write_text("plain")
    client = await make_client()
    response = await client.get("/api/files/outputs/visible.txt")
    assert response.status == 403 and (await response.json())["error"] == "path_refused"
    assert (await client.get("/api/files/outputs/outside.txt")).status == 403
    listed = await (await client.get("/api/files/outputs")).json()
    assert [item["name"] for item in listed["files"]] == ["plain.txt"]


@pytest.mark.asyncio
async def test_outputs_are_not_written_through_a_symlinked_subfolder(aiohttp_client, tmp_path):
    import nodegraph_basic

    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    registry = counting_registry()
    registry.add_pack("basic", nodegraph_basic.NODES)
    client = await make_client_factory(aiohttp_client, registry, tmp_path)()
    run_id = await submit(client, doc(t=("Text", {"value": "x"}),
                                      s=("SaveText", {"text": link("t", "value"), "filename_prefix": "sub/x"})))
    run = await wait_status(client, run_id, ("succeeded", "failed"))
    assert run["status"] == "failed" and run["error"]["exception"] == "OutputPathRefused"
    assert "outside the output folder" in run["error"]["message"]
    assert list((tmp_path / "elsewhere").iterdir()) == []
