"""File routes: image uploads (type, size and pixel limits), downloads with path checks, saved workflows."""

from __future__ import annotations

import io
import os

import aiohttp
import pytest
from PIL import Image

from _server_fixtures import SUM, make_client, registry, submit, wait_status  # noqa: F401
from nodegraph.server.folders import PathRefused, ServedFolder, safe_file_name


def png_bytes(width: int = 8, height: int = 6, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_form(data: bytes, filename: str = "cat.png", field: str = "file") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field(field, data, filename=filename, content_type="application/octet-stream")
    return form


@pytest.mark.asyncio
async def test_upload_stores_a_validated_image_and_serves_it(make_client, tmp_path):
    client = await make_client()
    data = png_bytes()
    response = await client.post("/api/files/inputs", data=upload_form(data, "../../My Cat!.png"))
    assert response.status == 201, await response.text()
    body = await response.json()
    # The client's name is reduced to a plain file name inside inputs/.
    assert body["name"] == "My_Cat_.png" and (body["width"], body["height"]) == (8, 6) and body["format"] == "PNG"
    assert (tmp_path / "inputs" / "My_Cat_.png").read_bytes() == data

    # The same bytes again reuse the file; other bytes under the same name get a new name.
    again = await (await client.post("/api/files/inputs", data=upload_form(data, "My Cat!.png"))).json()
    assert again["name"] == "My_Cat_.png"
    other = await (await client.post("/api/files/inputs", data=upload_form(png_bytes(colour=(0, 0, 255)),
                                                                             "My Cat!.png"))).json()
    assert other["name"] == "My_Cat__1.png"

    download = await client.get(body["url"])
    assert download.status == 200 and await download.read() == data
    assert download.headers["Content-Type"] == "image/png"
    listed = await (await client.get("/api/files/inputs?images=1")).json()
    assert sorted(item["name"] for item in listed["files"]) == ["My_Cat_.png", "My_Cat__1.png"]


@pytest.mark.asyncio
async def test_upload_refuses_non_images_bombs_and_oversized_bodies(make_client, tmp_path):
    client = await make_client(max_upload_bytes=4096, max_upload_pixels=100 * 100)
    response = await client.post("/api/files/inputs", data=upload_form(b"<html>not an image</html>", "x.png"))
    assert response.status == 415 and (await response.json())["error"] == "unsupported_image"

    # A small file whose header claims many pixels is refused before decoding.
    response = await client.post("/api/files/inputs", data=upload_form(png_bytes(200, 200)))
    assert response.status == 415 and "pixels" in (await response.json())["message"]

    truncated = png_bytes(64, 64)[:-40]
    response = await client.post("/api/files/inputs", data=upload_form(truncated))
    assert response.status == 415

    noise = Image.frombytes("RGB", (60, 60), os.urandom(60 * 60 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 4096
    response = await client.post("/api/files/inputs", data=upload_form(buffer.getvalue()))
    assert response.status == 413 and (await response.json())["error"] == "upload_too_large"

    response = await client.post("/api/files/inputs", data=upload_form(png_bytes(), field="picture"))
    assert response.status == 400
    assert not (tmp_path / "inputs").exists() or not any((tmp_path / "inputs").iterdir())


@pytest.mark.asyncio
async def test_downloads_stay_inside_their_folders(make_client, tmp_path):
    client = await make_client()
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "sub" / "ok.txt").write_text("fine")
    (tmp_path / "secret.txt").write_text("TOPSECRET-CONTENT")
    (tmp_path / "out" / ".hidden").write_text("hidden")
    (tmp_path / "out" / "page.html").write_text("<script>alert(1)</script>")
    os.symlink(tmp_path / "secret.txt", tmp_path / "out" / "link.txt")
    os.symlink(tmp_path, tmp_path / "out" / "linkdir")

    ok = await client.get("/api/files/outputs/sub/ok.txt")
    assert ok.status == 200 and await ok.text() == "fine"

    refused = ["link.txt", "linkdir/secret.txt", ".hidden", "sub/..%2F..%2Fsecret.txt", "%2E%2E/secret.txt",
               "..%5Csecret.txt", "%2Fetc%2Fpasswd"]
    for path in refused:
        response = await client.get(f"/api/files/outputs/{path}")
        assert response.status in (403, 404), path
        assert "TOPSECRET" not in await response.text(), path
    # aiohttp normalises a plain ../ in the URL itself; the route never sees it.
    response = await client.get("/api/files/outputs/../secret.txt")
    assert response.status in (403, 404) and "TOPSECRET" not in await response.text()
    assert (await client.get("/api/files/outputs/missing.png")).status == 404
    assert (await client.get("/api/files/workflows/x.json")).status == 404
    assert (await client.get("/api/files/etc/passwd")).status == 404

    # Pages that could run scripts in this origin are sent as downloads.
    page = await client.get("/api/files/outputs/page.html")
    assert page.headers["Content-Type"] == "application/octet-stream"
    assert page.headers["Content-Disposition"].startswith("attachment")


def test_served_folder_path_rules(tmp_path):
    folder = ServedFolder("outputs", tmp_path)
    (tmp_path / "a.png").write_bytes(b"x")
    assert folder.resolve("a.png") == (tmp_path / "a.png").resolve()
    for bad in ["../a.png", "/etc/passwd", "sub/../a.png", "./a.png", "C:/x", "a\\b", ".a", "", "a\x00"]:
        with pytest.raises(PathRefused):
            folder.resolve(bad)
    assert folder.relative(tmp_path / "a.png") == "a.png"
    assert folder.relative(tmp_path.parent / "x") is None
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("..") == "upload"


@pytest.mark.asyncio
async def test_run_files_have_download_urls(make_client, tmp_path):
    from _server_fixtures import doc, link

    client = await make_client()
    source = tmp_path / "in.txt"
    source.write_text("hello")
    # ReadFile's text goes to a Sink; the run reports no files, so the URL list is empty but present.
    run_id = await submit(client, doc(r=("ReadFile", {"path": str(source)}), out=("Sink", {"value": link("r", "text")})))
    run = await wait_status(client, run_id, ("succeeded", "failed"))
    assert run["status"] == "succeeded" and run["files"] == [] and run["file_urls"] == []


@pytest.mark.asyncio
async def test_saved_workflows(make_client, tmp_path):
    client = await make_client()
    assert (await (await client.get("/api/workflows")).json()) == {"workflows": []}
    response = await client.put("/api/workflows/sum.json", json=SUM)
    assert response.status == 201
    assert (await (await client.get("/api/workflows/sum.json")).json()) == SUM
    names = [item["name"] for item in (await (await client.get("/api/workflows")).json())["workflows"]]
    assert names == ["sum.json"]

    for bad in ["..%2Fsum.json", "sum.txt", ".sum.json", "a%20b.json"]:
        assert (await client.put(f"/api/workflows/{bad}", json=SUM)).status in (400, 403, 404), bad
    assert (await client.put("/api/workflows/bad.json", json=[1, 2])).status == 400
    assert (await client.get("/api/workflows/none.json")).status == 404
    assert sorted(p.name for p in (tmp_path / "workflows").iterdir()) == ["sum.json"]


class ListFormat:
    """A made-up foreign format: {"steps": [numbers]} becomes a chain of Value nodes into a Sink."""

    name = "list format"

    def detect(self, document) -> bool:
        return isinstance(document, dict) and isinstance(document.get("steps"), list)

    def convert(self, document) -> dict:
        from nodegraph.importers import WorkflowImportError

        if not all(isinstance(step, (int, float)) for step in document["steps"]):
            raise WorkflowImportError(self.name, {"NotANumber": ["0"]})
        nodes = {f"v{i}": {"type": "Value", "inputs": {"value": step}} for i, step in enumerate(document["steps"])}
        nodes["out"] = {"type": "Sink", "inputs": {"value": {"from": "v0", "output": "value"}}}
        return {"version": 1, "nodes": nodes}


@pytest.mark.asyncio
async def test_convert_foreign_workflows(aiohttp_client, tmp_path):
    from _server_fixtures import counting_registry, make_client_factory

    registry = counting_registry()
    registry.add_pack("list", [], importers=[ListFormat()])
    client = await make_client_factory(aiohttp_client, registry, tmp_path)()

    response = await client.post("/api/workflows/convert", json={"steps": [4, 5]})
    body = await response.json()
    assert response.status == 200 and body["importer"] == "list format"
    assert body["workflow"]["nodes"]["v1"] == {"type": "Value", "inputs": {"value": 5}}
    assert (await client.post("/api/runs", json={"workflow": body["workflow"]})).status == 201

    same = await (await client.post("/api/workflows/convert", json=SUM)).json()
    assert same == {"workflow": SUM, "importer": None}

    refused = await client.post("/api/workflows/convert", json={"steps": ["x"]})
    assert refused.status == 400 and (await refused.json())["error"] == "cannot_import"
    assert "NotANumber" in (await refused.json())["message"]
    unknown = await client.post("/api/workflows/convert", json={"something": "else"})
    assert unknown.status == 422 and "list format" in (await unknown.json())["message"]
