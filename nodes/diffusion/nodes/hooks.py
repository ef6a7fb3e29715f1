"""LoRA hooks (ComfyUI's hook nodes): LoRAs that act only on the conditionings they are attached to,
their strength scheduled by keyframes, and the nodes that attach them (sampling.hooks holds the maths)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CLIP, CONDITIONING, MASK, SocketType

from ..architectures import lora
from ..architectures.detection import ModelFamily
from ..components import TextEncoders
from ..sampling.guidance import Conditioning
from ..sampling.hooks import (
    INTERPOLATIONS,
    HookKeyframe,
    HookKeyframes,
    Hooks,
    LoraHook,
    clip_schedule,
    combined,
    interpolated_keyframes,
)
from ..weights.patching import WeightPatches
from .common import InputError
from .loading import ModelFileNode, model_file

# ComfyUI's names for these values.
HOOKS = SocketType("HOOKS", "LoRA hooks: LoRAs that act only on the conditionings they are attached to.", "#b2dfdb")
HOOK_KEYFRAMES = SocketType("HOOK_KEYFRAMES", "Keyframes scheduling a hook's strength over sampling.", "#80cbc4")
TIMESTEPS_RANGE = SocketType("TIMESTEPS_RANGE", "A part of sampling: (start, end), 0 = first step, 1 = last.",
                             "#4db6ac")

# The text-encoder families whose LoRAs this library matches by slot (SD3's and Flux's are matched with
# their diffusion model, lora_transformers).
_CLIP_FAMILIES = frozenset({ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.SDXL_REFINER})
_STRENGTH = Field(1.0, ge=-20.0, le=20.0)


class CreateLoraHook(ModelFileNode):
    """A LoRA (from the loras folder) as a hook: attached to conditionings (SetClipHooks,
    SetConditioningProperties) it patches the diffusion model only while they are evaluated, and
    SetClipHooks applies its text-encoder part when encoding. Chain several through `previous`."""

    category = "hooks"
    model_kind = "loras"

    class Inputs(NodeInputs):
        name: model_file("loras")  # type: ignore[valid-type]
        strength_model: float = _STRENGTH
        strength_clip: float = _STRENGTH
        previous: Optional[HOOKS.annotation] = None

    class Outputs(NodeOutputs):
        hooks: HOOKS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        previous: Hooks = inputs.previous or ()
        if inputs.strength_model == 0 and inputs.strength_clip == 0:
            return self.Outputs(hooks=previous)
        try:
            lora_file = lora.load_lora(self.model_path(inputs.name))
        except lora.LoraFormatError as error:
            raise InputError("name", str(error)) from None
        hook = LoraHook(lora_file, inputs.strength_model, inputs.strength_clip, name=inputs.name)
        return self.Outputs(hooks=combined(previous, (hook,)))


class SetHookKeyframes(Node):
    """Schedule the strength of hooks over sampling by keyframes (none: the hooks act at full strength)."""

    category = "hooks"

    class Inputs(NodeInputs):
        hooks: HOOKS.annotation
        keyframes: Optional[HOOK_KEYFRAMES.annotation] = None

    class Outputs(NodeOutputs):
        hooks: HOOKS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        if inputs.keyframes is None:
            return self.Outputs(hooks=inputs.hooks)
        return self.Outputs(hooks=tuple(hook.with_keyframes(inputs.keyframes) for hook in inputs.hooks))


class CreateHookKeyframe(Node):
    """One keyframe: from `start_percent` of sampling on, hooks act at `strength` times their own
    strengths (held for at least one step). Chain several through `previous`."""

    category = "hooks"

    class Inputs(NodeInputs):
        strength: float = Field(1.0, ge=-20.0, le=20.0, description="Multiplies the hooks' strengths.")
        start_percent: float = Field(0.0, ge=0.0, le=1.0, description="Where it starts (0 = first step).")
        previous: Optional[HOOK_KEYFRAMES.annotation] = None

    class Outputs(NodeOutputs):
        keyframes: HOOK_KEYFRAMES.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        previous: HookKeyframes = inputs.previous or HookKeyframes()
        return self.Outputs(keyframes=previous.plus(HookKeyframe(inputs.strength, inputs.start_percent)))


class InterpolateHookKeyframes(Node):
    """`count` keyframes evenly spaced from start_percent to end_percent of sampling, their strengths
    going from strength_start to strength_end by the interpolation (linear, ease in/out)."""

    category = "hooks"

    class Inputs(NodeInputs):
        strength_start: float = Field(1.0, ge=0.0, le=10.0)
        strength_end: float = Field(1.0, ge=0.0, le=10.0)
        interpolation: Literal[INTERPOLATIONS] = "linear"  # type: ignore[valid-type]
        start_percent: float = Field(0.0, ge=0.0, le=1.0)
        end_percent: float = Field(1.0, ge=0.0, le=1.0)
        count: int = Field(5, ge=2, le=100, description="How many keyframes.")
        log_keyframes: bool = Field(False, description="Log each keyframe's start and strength.")
        previous: Optional[HOOK_KEYFRAMES.annotation] = None

    class Outputs(NodeOutputs):
        keyframes: HOOK_KEYFRAMES.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        keyframes = interpolated_keyframes(inputs.strength_start, inputs.strength_end, inputs.interpolation,
                                           inputs.start_percent, inputs.end_percent, inputs.count)
        if inputs.log_keyframes:
            for keyframe in keyframes:
                ctx.log.info("hook keyframe from %.4f of sampling: strength %.4f", keyframe.start_percent,
                             keyframe.strength)
        previous: HookKeyframes = inputs.previous or HookKeyframes()
        return self.Outputs(keyframes=previous.plus(*keyframes))


class CombineHooks(Node):
    """All hooks of up to eight groups in one (a hook in several counts once)."""

    category = "hooks"

    class Inputs(NodeInputs):
        a: Optional[HOOKS.annotation] = None
        b: Optional[HOOKS.annotation] = None
        c: Optional[HOOKS.annotation] = None
        d: Optional[HOOKS.annotation] = None
        e: Optional[HOOKS.annotation] = None
        f: Optional[HOOKS.annotation] = None
        g: Optional[HOOKS.annotation] = None
        h: Optional[HOOKS.annotation] = None

    class Outputs(NodeOutputs):
        hooks: HOOKS.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(hooks=combined(inputs.a, inputs.b, inputs.c, inputs.d, inputs.e, inputs.f, inputs.g,
                                           inputs.h))


class SetClipHooks(Node):
    """Give text encoders LoRA hooks: their text-encoder part applies when encoding (at each hook's
    strength_clip; with schedule_clip at its keyframe strength too), and with apply_to_conds every
    conditioning encoded carries the hooks to the sampler. Replaces hooks set before."""

    category = "hooks"

    class Inputs(NodeInputs):
        clip: CLIP.annotation
        apply_to_conds: bool = Field(True, description="Conditionings encoded carry the hooks to the sampler.")
        schedule_clip: bool = Field(False, description="Apply the hooks' keyframe strengths when encoding.")
        hooks: Optional[HOOKS.annotation] = None

    class Outputs(NodeOutputs):
        clip: CLIP.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        clip: TextEncoders = inputs.clip
        hooks: Hooks | None = inputs.hooks
        if hooks is None:
            return self.Outputs(clip=clip)
        if clip.family not in _CLIP_FAMILIES:
            raise InputError("clip", f"LoRA hooks apply to SD1.x/SD2.x/SDXL text encoders; these are "
                                     f"{clip.family.label}'s")
        strengths = (1.0,) * len(hooks)
        if inputs.schedule_clip:
            schedule = clip_schedule(hooks)
            if len(schedule) != 1:
                raise InputError("schedule_clip", "the hooks' keyframes change their strength during sampling, "
                                                  "which would need one encoding per part of sampling; that is not "
                                                  "supported: set schedule_clip off (the text encoders then apply "
                                                  "the hooks at their full strength_clip)")
            strengths = schedule[0][1]
        patches: dict[str, WeightPatches] = {}
        for hook in hooks:
            if hook.weights.family is not None and hook.weights.family != clip.family.latent_family:
                raise InputError("hooks", f"LoRA {hook.name} was made for {hook.weights.family} models; these "
                                          f"are {clip.family.label} text encoders")
        for slot, encoder in clip.encoders.items():
            params = encoder.state_dict()
            for hook, strength in zip(hooks, strengths):
                deltas, _ = hook.weights.deltas(slot, params)
                if deltas:
                    patches[slot] = patches.get(slot, WeightPatches()).plus(deltas, hook.strength_clip * strength)
        ctx.log.info("LoRA hooks %s: text-encoder patches on %s", ", ".join(hook.name for hook in hooks),
                     ", ".join(patches) or "no encoder")
        return self.Outputs(clip=clip.with_hooks(patches, hooks if inputs.apply_to_conds else None))


_AREA = Literal["default", "mask bounds"]


def _with_properties(conditioning: Conditioning, strength: float, set_cond_area: str,
                     mask: Any, hooks: Hooks | None, timesteps: tuple[float, float] | None) -> Conditioning:
    """The entries with the hooks added to theirs, the mask (at `strength`) and the timestep range set,
    each only when given (ComfyUI's set_conds_props)."""
    out = []
    for entry in conditioning:
        changes: dict[str, Any] = {}
        if hooks:
            changes["hooks"] = combined(entry.hooks, hooks)
        if mask is not None:
            if set_cond_area != "default":
                raise InputError("set_cond_area", "'mask bounds' (the conditioning's area cut to the mask's bounding "
                                                  "box) is not supported: use 'default'")
            changes["mask"] = mask if mask.ndim == 3 else mask[None]
            changes["mask_strength"] = strength
        if timesteps is not None:
            changes["start"], changes["end"] = timesteps
        out.append(entry.with_(**changes) if changes else entry)
    return tuple(out)


class _PropertiesInputs(NodeInputs):
    strength: float = Field(1.0, ge=0.0, le=10.0, description="The mask's strength (with a mask).")
    set_cond_area: _AREA = "default"  # type: ignore[valid-type]
    mask: Optional[MASK.annotation] = None
    hooks: Optional[HOOKS.annotation] = None
    timesteps: Optional[TIMESTEPS_RANGE.annotation] = None

    def apply(self, conditioning: Conditioning) -> Conditioning:
        """`conditioning` with these properties (hooks, mask at strength, timestep range), each when given."""
        return _with_properties(conditioning, self.strength, self.set_cond_area, self.mask, self.hooks,
                                self.timesteps)


class SetConditioningProperties(Node):
    """Attach hooks to a conditioning, restrict it to a mask (at a strength) and to a part of sampling,
    each only when given."""

    category = "hooks"

    class Inputs(_PropertiesInputs):
        conditioning: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=inputs.apply(inputs.conditioning))


class SetConditioningPairProperties(Node):
    """SetConditioningProperties for a positive and a negative conditioning alike."""

    category = "hooks"

    class Inputs(_PropertiesInputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(positive=inputs.apply(inputs.positive), negative=inputs.apply(inputs.negative))


class AddConditioningWithProperties(Node):
    """`added` with SetConditioningProperties' properties, then combined with `conditioning` (both apply)."""

    category = "hooks"

    class Inputs(_PropertiesInputs):
        conditioning: CONDITIONING.annotation
        added: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=tuple(inputs.conditioning) + inputs.apply(inputs.added))


class AddConditioningPairWithProperties(Node):
    """AddConditioningWithProperties for a positive and a negative pair alike."""

    category = "hooks"

    class Inputs(_PropertiesInputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation
        added_positive: CONDITIONING.annotation
        added_negative: CONDITIONING.annotation

    class Outputs(NodeOutputs):
        positive: CONDITIONING.annotation
        negative: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(positive=tuple(inputs.positive) + inputs.apply(inputs.added_positive),
                            negative=tuple(inputs.negative) + inputs.apply(inputs.added_negative))


class SetModelHooksOnConditioning(Node):
    """Attach hooks to every entry of a conditioning (added to the hooks it has)."""

    category = "hooks"

    class Inputs(NodeInputs):
        conditioning: CONDITIONING.annotation
        hooks: HOOKS.annotation

    class Outputs(NodeOutputs):
        conditioning: CONDITIONING.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        return self.Outputs(conditioning=tuple(entry.with_(hooks=combined(entry.hooks, inputs.hooks))
                                               for entry in inputs.conditioning))


class TimestepsRange(Node):
    """A part of sampling (0 = first step, 1 = last), with the parts before and after it."""

    category = "hooks"

    class Inputs(NodeInputs):
        start_percent: float = Field(0.0, ge=0.0, le=1.0)
        end_percent: float = Field(1.0, ge=0.0, le=1.0)

    class Outputs(NodeOutputs):
        range: TIMESTEPS_RANGE.annotation
        before: TIMESTEPS_RANGE.annotation
        after: TIMESTEPS_RANGE.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        start, end = inputs.start_percent, inputs.end_percent
        return self.Outputs(range=(start, end), before=(0.0, start), after=(end, 1.0))


NODES: list[type[Node]] = [CreateLoraHook, SetHookKeyframes, CreateHookKeyframe, InterpolateHookKeyframes,
                           CombineHooks, SetClipHooks, SetConditioningProperties, SetConditioningPairProperties,
                           AddConditioningWithProperties, AddConditioningPairWithProperties,
                           SetModelHooksOnConditioning, TimestepsRange]
