"""The JSON form of events shared by `nodegraph run --json` and the WebSocket: previews as JPEG data URLs."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from nodegraph import events as ev
from nodegraph.event_json import PREVIEW_MAX_SIDE, event_json
from nodegraph.events import Event


def decode(data_url: str) -> Image.Image:
    header, payload = data_url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_preview_becomes_a_jpeg_data_url():
    image = Image.new("RGB", (64, 32), (250, 0, 0))
    data = event_json(Event(ev.NODE_PREVIEW, "r", "sampler", {"image": image}))
    json.dumps(data)  # plain JSON now
    picture = decode(data["image"])
    assert picture.format == "JPEG" and picture.size == (64, 32) == (data["width"], data["height"])
    red, green, blue = picture.convert("RGB").getpixel((10, 10))
    assert red > 230 and green < 25 and blue < 25
    assert data["node_id"] == "sampler" and data["type"] == "node_preview"


def test_large_or_odd_previews_are_shrunk_and_converted():
    data = event_json(Event(ev.NODE_PREVIEW, "r", "n", {"image": Image.new("RGBA", (2048, 1024))}))
    assert decode(data["image"]).size == (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE // 2) == (data["width"], data["height"])
    with pytest.raises(TypeError, match="PIL image"):
        event_json(Event(ev.NODE_PREVIEW, "r", "n", {"image": b"not an image"}))


def test_other_events_are_unchanged():
    event = Event(ev.NODE_PROGRESS, "r", "n", {"value": 3, "max": 10}, time=5.0)
    assert event_json(event) == {"type": "node_progress", "run_id": "r", "node_id": "n", "time": 5.0, "value": 3, "max": 10}
