"""A test node pack that makes pictures from a prompt: step previews and PNG files like a diffusion graph."""

from __future__ import annotations

import hashlib
import io
import json
import time

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from pydantic import Field

from nodegraph.files import write_numbered
from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import IMAGE


def _colour(text: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return digest[0], digest[1], digest[2]


class PromptPicture(Node):
    """Draws the prompt on a background coloured by prompt and seed, step by step, with previews."""

    category = "picture"

    class Inputs(NodeInputs):
        prompt: str = Field("a red circle", description="What to draw.", json_schema_extra={"multiline": True})
        seed: int = Field(0, ge=0, le=2**32 - 1, description="Changes the colour.")
        steps: int = Field(4, ge=1, le=100, description="How many steps, one preview each.")
        width: int = Field(128, ge=16, le=1024, multiple_of=8)
        height: int = Field(96, ge=16, le=1024, multiple_of=8)
        delay: float = Field(0.0, ge=0, le=2, description="Seconds per step, to watch progress.")

    class Outputs(NodeOutputs):
        image: IMAGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        picture = Image.new("RGB", (inputs.width, inputs.height), _colour(inputs.prompt, inputs.seed))
        draw = ImageDraw.Draw(picture)
        for step in range(1, inputs.steps + 1):
            time.sleep(inputs.delay)
            top = inputs.height * step // (inputs.steps + 1)
            draw.line([(0, top), (inputs.width, top)], fill=(255, 255, 255), width=1)
            ctx.progress(step, inputs.steps, picture.resize((max(8, inputs.width // 2), max(8, inputs.height // 2))))
        draw.text((4, 4), inputs.prompt, fill=(255, 255, 255))
        return self.Outputs(image=picture)


class SavePicture(Node):
    """Writes the picture as a new numbered PNG in the output folder, the workflow in its text."""

    category = "picture"
    output_node = True

    class Inputs(NodeInputs):
        image: IMAGE.annotation = Field(description="The picture.")
        filename_prefix: str = Field("picture", description="File name prefix.")

    class Outputs(NodeOutputs):
        pass

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        # The workflow travels in the PNG, as with the diffusion pack's SaveImage, so the editor can reopen it.
        text = PngInfo()
        text.add_text("workflow", json.dumps(ctx.workflow))
        buffer = io.BytesIO()
        inputs.image.save(buffer, format="PNG", pnginfo=text)
        ctx.record_file(write_numbered(ctx.output_dir, inputs.filename_prefix, ".png", buffer.getvalue()))
        return self.Outputs()


NODES: list[type[Node]] = [PromptPicture, SavePicture]
