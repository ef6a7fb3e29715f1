"""Model merging nodes: blend, add or subtract two diffusion models' (or text encoders') weights, per block if wanted.

The merged model is the first with a weight patch (:mod:`..weights.merging`): nothing is copied,
both inputs stay as they were, and a LoRA applied after the merge adds to the merged weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import Field, create_model

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, MODEL

from ..components import DiffusionModel, TextEncoders
from ..weights import merging
from ..weights.patching import WeightPatches
from .common import InputError


@contextmanager
def _refused_on(input_name: str) -> Iterator[None]:
    """A merge the weights refuse (merging.MergeError) as an InputError on `input_name`."""
    try:
        yield
    except merging.MergeError as error:
        raise InputError(input_name, str(error)) from None


def _merge_models(model1: DiffusionModel, model2: DiffusionModel, strengths: merging.Strengths,
                  node: str, ctx: RunContext) -> DiffusionModel:
    """model1 with model2 merged in: its network, sampling and latent format, merged weights."""
    if (type(model1.network) is not type(model2.network)
            or model1.family.latent_family != model2.family.latent_family):
        raise InputError("model2", f"{node}: model2 is {model2.family.label}, model1 {model1.family.label}: "
                                   "models of different architectures cannot be merged")
    with _refused_on("model2"):
        plan = merging.merge_deltas(model1.network, model1.patches, model2.network, model2.patches, strengths,
                                    source=f"{node} of {model1.name or 'model1'} and {model2.name or 'model2'}")
    ctx.log.info("%s: %d weights merged, %d of other shapes left as model1's", node, len(plan.deltas),
                 len(plan.mismatched))
    return model1.with_patch(plan.deltas, 1.0) if plan.deltas else model1


def _merge_text_encoders(clip1: TextEncoders, clip2: TextEncoders, strengths: merging.Strengths,
                         node: str, ctx: RunContext) -> TextEncoders:
    """clip1 with each of its encoders merged with clip2's encoder of the same slot (CLIP-L, -G, ...)."""
    slots = [slot for slot in clip1.encoders if slot in clip2.encoders]
    if not slots:
        raise InputError("clip2", f"{node}: the text encoders share no encoder to merge (clip1 has "
                                  f"{', '.join(clip1.encoders)}, clip2 {', '.join(clip2.encoders)})")
    deltas = {}
    for slot in slots:
        with _refused_on("clip2"):
            plan = merging.merge_deltas(
                clip1.encoders[slot], clip1.patches.get(slot, WeightPatches()), clip2.encoders[slot],
                clip2.patches.get(slot, WeightPatches()), strengths, source=f"{node} {slot}",
                skip=merging.text_encoder_skipped)
        ctx.log.info("%s: %s: %d weights merged", node, slot, len(plan.deltas))
        if plan.deltas:
            deltas[slot] = plan.deltas
    return clip1.with_patches(deltas, 1.0)


def _blend(ratio: float) -> merging.Strengths:
    """ratio * first + (1 - ratio) * second, every weight (MergeModels, MergeTextEncoders)."""
    return merging.weighted_sum(lambda name: ratio)


def _add() -> merging.Strengths:
    """first + second, every weight (AddModels, AddTextEncoders)."""
    return merging.uniform(1.0, 1.0)


def _difference(multiplier: float) -> merging.Strengths:
    """multiplier * (first - second), every weight (SubtractModels, SubtractTextEncoders)."""
    return merging.uniform(-multiplier, multiplier)


def _ratio() -> Any:
    return Field(1.0, ge=0.0, le=1.0, description="Share of model1 (1: model1 alone, 0: model2 alone).")


def _multiplier() -> Any:
    return Field(1.0, ge=-10.0, le=10.0, description="Scale of the difference.")


class MergeModels(Node):
    """Weighted sum of two diffusion models of one architecture: ratio * model1 + (1 - ratio) *
    model2, weight by weight (each with the LoRAs applied to it before). Sampling settings are model1's."""

    category = "model/merging"

    class Inputs(NodeInputs):
        model1: MODEL.annotation
        model2: MODEL.annotation
        ratio: float = _ratio()

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(model=_merge_models(inputs.model1, inputs.model2, _blend(inputs.ratio), "MergeModels", ctx))


class AddModels(Node):
    """model1 + model2, weight by weight: adds a difference made by SubtractModels (an "add
    difference" merge: inpainting model + (custom model - its base))."""

    category = "model/merging"

    class Inputs(NodeInputs):
        model1: MODEL.annotation
        model2: MODEL.annotation

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(model=_merge_models(inputs.model1, inputs.model2, _add(), "AddModels", ctx))


class SubtractModels(Node):
    """multiplier * (model1 - model2), weight by weight: what a fine-tune (model1) changed in its
    base (model2), to add to another model with AddModels."""

    category = "model/merging"

    class Inputs(NodeInputs):
        model1: MODEL.annotation
        model2: MODEL.annotation
        multiplier: float = _multiplier()

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(model=_merge_models(inputs.model1, inputs.model2, _difference(inputs.multiplier),
                                                "SubtractModels", ctx))


class MergeModelBlocks(Node):
    """Weighted sum of two U-Nets with a ratio per part: input (the input blocks, and the time and
    label embeddings), middle (the middle block) and out (the output blocks and the final layers).
    Each ratio is model1's share."""

    category = "model/merging"

    class Inputs(NodeInputs):
        model1: MODEL.annotation
        model2: MODEL.annotation
        input: float = _ratio()
        middle: float = _ratio()
        out: float = _ratio()

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        # Prefixes as ComfyUI matches them ("out" covers out. and output_blocks.); others take `input`.
        ratio_of = merging.prefix_ratio({"input": inputs.input, "middle": inputs.middle, "out": inputs.out},
                                        default=inputs.input)
        return self.Outputs(model=_merge_models(inputs.model1, inputs.model2, merging.weighted_sum(ratio_of),
                                                "MergeModelBlocks", ctx))


def unet_block_prefixes(input_blocks: int, output_blocks: int) -> list[str]:
    """The U-Net's parts a per-block merge sets a ratio for, as parameter-name prefixes, in
    ComfyUI's order: time_embed., label_emb., input_blocks.i., middle_block.0-2., output_blocks.i., out."""
    return (["time_embed.", "label_emb."] + [f"input_blocks.{i}." for i in range(input_blocks)]
            + [f"middle_block.{i}." for i in range(3)] + [f"output_blocks.{i}." for i in range(output_blocks)]
            + ["out."])


def block_input_name(prefix: str) -> str:
    """input_blocks.3. -> input_blocks_3 (an input name)."""
    return prefix.rstrip(".").replace(".", "_")


def _per_block_node(name: str, blocks: int, doc: str) -> type[Node]:
    """A per-block merge node for a U-Net with `blocks` input and output blocks."""
    prefixes = unet_block_prefixes(blocks, blocks)
    fields: dict[str, Any] = {"model1": (MODEL.annotation, ...), "model2": (MODEL.annotation, ...)}
    for prefix in prefixes:
        fields[block_input_name(prefix)] = (float, Field(1.0, ge=0.0, le=1.0,
                                                         description=f"model1's share of {prefix}*"))
    inputs_class = create_model(f"{name}Inputs", __base__=NodeInputs, **fields)

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self: Node, inputs: Any, ctx: RunContext) -> Any:
        ratios = {prefix: getattr(inputs, block_input_name(prefix)) for prefix in prefixes}
        ratio_of = merging.prefix_ratio(ratios, default=ratios[prefixes[0]])
        return Outputs(model=_merge_models(inputs.model1, inputs.model2, merging.weighted_sum(ratio_of), name, ctx))

    namespace: dict[str, Any] = {"__doc__": doc, "__module__": __name__, "category": "model/merging",
                                 "Inputs": inputs_class, "Outputs": Outputs, "run": run,
                                 "block_prefixes": prefixes}
    return type(name, (Node,), namespace)


MergeModelBlocksSD1 = _per_block_node(
    "MergeModelBlocksSD1", 12,
    "Weighted sum of two SD1.x or SD2.x U-Nets with model1's share set per block: the time and label "
    "embeddings, each of the 12 input blocks, the 3 parts of the middle block, the 12 output blocks "
    "and the final layers.")
MergeModelBlocksSDXL = _per_block_node(
    "MergeModelBlocksSDXL", 9,
    "Weighted sum of two SDXL U-Nets with model1's share set per block: the time and label "
    "embeddings, each of the 9 input blocks, the 3 parts of the middle block, the 9 output blocks "
    "and the final layers.")


class MergeTextEncoders(Node):
    """Weighted sum of two sets of text encoders, encoder by encoder (CLIP-L with CLIP-L, ...):
    ratio * clip1 + (1 - ratio) * clip2. Clip skip and the rest are clip1's."""

    category = "model/merging"

    class Inputs(NodeInputs):
        clip1: CLIP.annotation
        clip2: CLIP.annotation
        ratio: float = _ratio()

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(clip=_merge_text_encoders(inputs.clip1, inputs.clip2, _blend(inputs.ratio),
                                                      "MergeTextEncoders", ctx))


class AddTextEncoders(Node):
    """clip1 + clip2, encoder by encoder and weight by weight (adds a SubtractTextEncoders difference)."""

    category = "model/merging"

    class Inputs(NodeInputs):
        clip1: CLIP.annotation
        clip2: CLIP.annotation

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(clip=_merge_text_encoders(inputs.clip1, inputs.clip2, _add(), "AddTextEncoders", ctx))


class SubtractTextEncoders(Node):
    """multiplier * (clip1 - clip2), encoder by encoder and weight by weight."""

    category = "model/merging"

    class Inputs(NodeInputs):
        clip1: CLIP.annotation
        clip2: CLIP.annotation
        multiplier: float = _multiplier()

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(clip=_merge_text_encoders(inputs.clip1, inputs.clip2, _difference(inputs.multiplier),
                                                      "SubtractTextEncoders", ctx))


NODES: list[type[Node]] = [MergeModels, AddModels, SubtractModels, MergeModelBlocks, MergeModelBlocksSD1,
                           MergeModelBlocksSDXL, MergeTextEncoders, AddTextEncoders, SubtractTextEncoders]
