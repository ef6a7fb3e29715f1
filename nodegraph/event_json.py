"""The JSON form of run events, one encoding for `nodegraph run --json` and the server's WebSocket."""

from __future__ import annotations

import base64
import io
from typing import Any

from . import events as ev
from .events import Event

PREVIEW_MAX_SIDE = 512
PREVIEW_QUALITY = 85


def encode_preview(image: Any) -> dict[str, Any]:
    """A preview image as `{"image": "data:image/jpeg;base64,...", "width": w, "height": h}`.

    `image` is a PIL image (the node contract); larger ones are shrunk to 512 px on the long side,
    since a preview is redrawn on every step and must stay cheap to send.
    """
    from PIL import Image  # pillow is a core dependency, but only previews need it here

    if not isinstance(image, Image.Image):
        raise TypeError(f"a preview must be a PIL image, got {type(image).__name__}")
    picture = image.convert("RGB")
    if max(picture.size) > PREVIEW_MAX_SIDE:
        picture.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"image": f"data:image/jpeg;base64,{data}", "width": picture.width, "height": picture.height}


def event_json(event: Event) -> dict[str, Any]:
    """An event as a JSON-ready dict: `type`, `run_id`, `node_id`, `time` and the event's data."""
    data = event.to_json()
    if event.type == ev.NODE_PREVIEW:
        data.update(encode_preview(data.pop("image")))
    return data
