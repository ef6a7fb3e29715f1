"""PhotoMaker (v1): load its ID encoder and encode an SDXL prompt with a face image fused in at the
class word (vision.photomaker holds the model)."""

from __future__ import annotations

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, CONDITIONING, IMAGE, SocketType

from ..components import MissingTextEncoderError, TextEncoders
from ..text.embeddings import EmbeddingNotFoundError
from ..vision.clip_vision import clip_preprocess
from ..vision.photomaker import (
    TRIGGER_WORD,
    PhotoMakerError,
    PhotoMakerIDEncoder,
    load_photomaker,
    trigger_position,
)
from .common import InputError, run_device
from .loading import ModelFileNode, model_file

PHOTOMAKER = SocketType("PHOTOMAKER", "A PhotoMaker ID encoder (face image -> SDXL prompt states).", "#ce93d8")
# Text states per chunk of a CLIP prompt: the ID is fused within the first.
_CHUNK = 77


class LoadPhotoMaker(ModelFileNode):
    """Load a PhotoMaker v1 ID encoder (photomaker-v1.bin or .safetensors) from the photomaker folder."""

    category = "loaders"
    model_kind = "photomaker"

    class Inputs(NodeInputs):
        name: model_file("photomaker")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        photomaker: PHOTOMAKER.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        try:
            model = load_photomaker(self.model_path(inputs.name), device=run_device(ctx))
        except PhotoMakerError as error:
            raise InputError("name", str(error)) from None
        ctx.log.info("%s: PhotoMaker ID encoder, CLIP vision width %d, ID embedding %d", inputs.name,
                     model.config.width, model.width)
        return self.Outputs(photomaker=model)


class PhotoMakerEncode(Node):
    """Encode an SDXL prompt with the face of `image` (its first image) fused into the text states at
    the class word: the word before "photomaker" ("photograph of a man photomaker"). As in ComfyUI, the
    position is the index of "photomaker" among the prompt's space-separated words, the trigger word
    stays in the prompt, and a prompt without it is encoded as it is."""

    category = "conditioning"

    class Inputs(NodeInputs):
        photomaker: PHOTOMAKER.annotation
        image: IMAGE.annotation
        clip: CLIP.annotation
        text: str = Field("photograph of photomaker", description="The prompt, with the trigger word after the "
                          "class word.", json_schema_extra={"multiline": True})

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        clip: TextEncoders | None = inputs.clip
        if clip is None:
            raise InputError("clip", "this checkpoint has no text encoders")
        photomaker: PhotoMakerIDEncoder = inputs.photomaker
        try:
            entry = clip.encode(inputs.text)
        except EmbeddingNotFoundError as error:
            raise InputError("text", str(error)) from None
        except MissingTextEncoderError as error:
            raise InputError("clip", str(error)) from None
        position = trigger_position(inputs.text)
        if position is None:
            ctx.log.warning("the prompt has no word %r: encoded without the image", TRIGGER_WORD)
            return self.Outputs(conditioning=(entry,))
        if position >= _CHUNK:
            raise InputError("text", f"{TRIGGER_WORD!r} is word {position + 1} of the prompt; the image is fused "
                                     f"within the first {_CHUNK} tokens: put it earlier")
        if inputs.image.shape[0] > 1:
            ctx.log.info("PhotoMaker uses the first of the %d images", inputs.image.shape[0])
        try:
            context = photomaker.fused(entry.context, [position], clip_preprocess(inputs.image))
        except PhotoMakerError as error:
            raise InputError("clip", str(error)) from None
        return self.Outputs(conditioning=(entry.with_(context=context),))


NODES: list[type[Node]] = [LoadPhotoMaker, PhotoMakerEncode]
