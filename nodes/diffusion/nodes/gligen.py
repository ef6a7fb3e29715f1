"""GLIGEN nodes: load a GLIGEN model and place phrases in boxes of a conditioning (networks.gligen)."""

from __future__ import annotations

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, CONDITIONING, SocketType

from ..components import MissingTextEncoderError, TextEncoders
from ..networks.gligen import MAX_OBJECTS, Gligen, Grounding, GroundingBox
from ..weights.safetensors_io import CheckpointError
from .common import InputError, run_device
from .loading import ModelFileNode, model_file

GLIGEN = SocketType("GLIGEN", "GLIGEN model: phrases placed in boxes for an SD U-Net.", "#8fb8de")


class LoadGligen(ModelFileNode):
    """Load a GLIGEN model from the gligen folder (ComfyUI's GLIGENLoader): gated self-attention
    layers for each transformer block of an SD1.x U-Net and the net that turns a phrase in a box
    into a grounding token (gligen_sd14_textbox_pruned.safetensors)."""

    category = "loaders"
    model_kind = "gligen"

    class Inputs(NodeInputs):
        name: model_file("gligen")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        gligen: GLIGEN.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            gligen = Gligen.load(self.model_path(inputs.name), device=run_device(ctx))
        except CheckpointError as error:  # GligenError, or a file that cannot be read
            raise InputError("name", str(error)) from None
        ctx.log.info("%s: fusers for %d transformer blocks, %d-wide phrases", inputs.name, len(gligen.fusers),
                     gligen.phrase_dim)
        return self.Outputs(gligen=gligen)


class ApplyGligenTextBox(Node):
    """Place a phrase in a box of the image (ComfyUI's GLIGENTextBoxApply): the model draws what the
    phrase says there, for every entry of the conditioning (apply to the positive prompt; the
    negative one runs without). Boxes of several of these nodes add up (at most 30). The phrase
    works best when the prompt also names it. Box in image pixels, multiples of 8."""

    category = "conditioning"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        clip: CLIP.annotation
        gligen: GLIGEN.annotation
        text: str = Field("", description="What is in the box.", json_schema_extra={"multiline": True})
        width: int = Field(64, ge=8, le=16384, multiple_of=8)
        height: int = Field(64, ge=8, le=16384, multiple_of=8)
        x: int = Field(0, ge=0, le=16384, multiple_of=8)
        y: int = Field(0, ge=0, le=16384, multiple_of=8)

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        gligen: Gligen = inputs.gligen
        clip: TextEncoders = inputs.clip
        try:
            phrase = clip.phrase_embedding(inputs.text)[0]
        except MissingTextEncoderError as error:
            raise InputError("clip", str(error)) from None
        if phrase.shape[0] != gligen.phrase_dim:
            raise InputError("clip", f"this text encoder's phrase embeddings are {phrase.shape[0]} wide; the GLIGEN "
                                     f"model takes {gligen.phrase_dim} (the text encoder of the model it was made for)")
        box = GroundingBox(phrase, inputs.height, inputs.width, inputs.y, inputs.x)
        out = []
        for entry in inputs.conditioning:
            # As ComfyUI does: the boxes so far are kept and read by the newest GLIGEN model.
            boxes = (entry.grounding.boxes if entry.grounding is not None else ()) + (box,)
            if len(boxes) > MAX_OBJECTS:
                raise InputError("conditioning", f"holds {len(boxes) - 1} GLIGEN boxes already; GLIGEN takes at "
                                                 f"most {MAX_OBJECTS}")
            out.append(entry.with_(grounding=Grounding(gligen, boxes)))
        return self.Outputs(conditioning=tuple(out))


NODES: list[type[Node]] = [LoadGligen, ApplyGligenTextBox]
