"""LoRA hooks (ComfyUI's hook nodes): a LoRA that acts only while the conditionings it is attached to
are evaluated, with its strength scheduled by keyframes over the sampling run.

A :class:`LoraHook` holds a parsed LoRA file and its model and text-encoder strengths. Attached to
conditioning entries (``CondEntry.hooks``), it patches the denoiser's weights only for the network
calls that evaluate those entries; entries without hooks see the model as it is (its own LoRAs
included). At a step the hook's model strength is ``strength_model * k``, where k is the strength of
its current keyframe (1 without keyframes).

Keyframes (:class:`HookKeyframe`: a strength from a point of sampling on, in percent of the run's
training schedule, as ConditioningSetTimestepRange counts) are walked as ComfyUI walks them: the
run starts on the first keyframe; at each new noise level the hook holds its keyframe for the
keyframe's ``guarantee_steps`` levels (counted only for keyframes that start inside the run), then
moves to the last keyframe in order whose start is at or above the level, stopping early on one
with guaranteed levels of its own (:class:`KeyframeCursor`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from torch import Tensor, nn

from ..networks.unet import UNetConfig
from ..weights import patching
from ..weights.patching import Deltas, WeightDelta, WeightPatches

logger = logging.getLogger(__name__)

# ComfyUI's interpolation names (comfy/hooks.py InterpolationMethod), in its order.
INTERPOLATIONS = ("linear", "ease_in", "ease_out", "ease_in_out")


class HookError(ValueError):
    """LoRA hooks that cannot act on this model (names the hook and what does not fit)."""


class HookWeights(Protocol):
    """The weights a hook adds, matched to a model's parameters (an ``architectures.lora.LoraFile``)."""

    path: str

    @property
    def family(self) -> str | None:
        """The model family the weights were made for ("sd1", "sdxl", ...), None when unknown."""
        ...

    def deltas(self, target: str, params: Mapping[str, Tensor]) -> tuple[Mapping[str, WeightDelta], list[str]]:
        """target: ``unet`` or a text-encoder slot -> (parameter name -> delta, the file's modules
        for that target that match nothing)."""
        ...


@dataclass(frozen=True)
class HookKeyframe:
    """From `start_percent` of sampling on, the hook acts at `strength` times its own strengths,
    for at least `guarantee_steps` noise levels once it is reached."""

    strength: float
    start_percent: float = 0.0
    guarantee_steps: int = 1


@dataclass(frozen=True)
class HookKeyframes:
    """A hook's keyframes, ordered by start (keyframes starting together keep the order they were added in)."""

    keyframes: tuple[HookKeyframe, ...] = ()

    def plus(self, *keyframes: HookKeyframe) -> HookKeyframes:
        return HookKeyframes(tuple(sorted(self.keyframes + keyframes, key=lambda k: k.start_percent)))

    def __len__(self) -> int:
        return len(self.keyframes)


def interpolated(start: float, end: float, count: int, method: str) -> list[float]:
    """`count` values from `start` to `end` at t = i / (count - 1): linear start + (end - start) t;
    ease_in (end - start) t^2 + start; ease_out (end - start)(1 - (1 - t)^2) + start; ease_in_out
    (end - start)(1 - cos(pi t)) / 2 + start."""
    if count < 2:
        raise ValueError(f"interpolation needs at least 2 values, got {count}")
    shapes: dict[str, Callable[[float], float]] = {
        "linear": lambda t: t,
        "ease_in": lambda t: t * t,
        "ease_out": lambda t: 1.0 - (1.0 - t) ** 2,
        "ease_in_out": lambda t: (1.0 - math.cos(t * math.pi)) / 2.0,
    }
    if method not in shapes:
        raise ValueError(f"unknown interpolation {method!r}; expected one of {', '.join(INTERPOLATIONS)}")
    return [start + (end - start) * shapes[method](i / (count - 1)) for i in range(count)]


def interpolated_keyframes(strength_start: float, strength_end: float, method: str, start_percent: float,
                           end_percent: float, count: int) -> tuple[HookKeyframe, ...]:
    """`count` keyframes at evenly spaced starts from start_percent to end_percent, their strengths
    interpolated by `method` (:func:`interpolated`); the first holds for one level, the rest for none
    (ComfyUI's CreateHookKeyframesInterpolated)."""
    starts = interpolated(start_percent, end_percent, count, "linear")
    strengths = interpolated(strength_start, strength_end, count, method)
    return tuple(HookKeyframe(strength, start, 1 if i == 0 else 0)
                 for i, (start, strength) in enumerate(zip(starts, strengths)))


@dataclass(frozen=True, eq=False)
class LoraHook:
    """A LoRA acting on the denoiser only for the conditionings it is attached to (and, through
    SetClipHooks, on the text encoders that encode them).

    ref: the hook's identity, kept when its keyframes are set: a hook combined with itself counts once.
    """

    weights: HookWeights
    strength_model: float
    strength_clip: float
    keyframes: HookKeyframes = HookKeyframes()
    name: str = ""
    ref: object = field(default_factory=object)

    def with_keyframes(self, keyframes: HookKeyframes) -> LoraHook:
        return replace(self, keyframes=keyframes)


Hooks = tuple[LoraHook, ...]


def combined(*groups: Sequence[LoraHook] | None) -> Hooks:
    """The hooks of all groups in order, each hook (by its ref) once: the first one kept."""
    out: list[LoraHook] = []
    for group in groups:
        for hook in group or ():
            if all(hook.ref is not seen.ref for seen in out):
                out.append(hook)
    return tuple(out)


def clip_schedule(hooks: Sequence[LoraHook]) -> list[tuple[tuple[float, float], tuple[float, ...]]]:
    """The parts of sampling over which every hook's keyframe strength stays the same, as ComfyUI's
    scheduled text encoding splits them: [((start, end), (strength of each hook)), ...] covering 0..1.

    Per hook, a keyframe opens a part when it starts later than the last one that did and its
    strength differs (a keyframe starting together with it takes its place); the last part runs to
    1. A hook has strength 1 where no part of its own covers (before its first keyframe, or without
    keyframes)."""
    own: list[list[tuple[tuple[float, float], float]]] = []
    for hook in hooks:
        keyframes = hook.keyframes.keyframes
        if not keyframes:
            own.append([((0.0, 1.0), 1.0)])
            continue
        parts, last = [], keyframes[0]
        for keyframe in keyframes:
            if keyframe.start_percent > last.start_percent and not math.isclose(keyframe.strength, last.strength):
                parts.append(((last.start_percent, keyframe.start_percent), last.strength))
                last = keyframe
            elif keyframe.start_percent == last.start_percent:
                last = keyframe
        if not math.isclose(last.start_percent, 1.0):
            parts.append(((last.start_percent, 1.0), last.strength))
        own.append(parts)
    bounds = sorted({0.0} | {point for parts in own for (span, _) in parts for point in span})
    schedule = []
    for start, end in zip(bounds, bounds[1:]):
        strengths = tuple(next((strength for (a, b), strength in parts if a < end and b > start), 1.0)
                          for parts in own)
        schedule.append(((start, end), strengths))
    return schedule


class KeyframeCursor:
    """Which keyframe a hook is on during one sampling run (ComfyUI's HookKeyframeGroup walk).

    sigma_of: sampling percent -> the sigma where it starts (the model's percent_to_sigma);
    max_sigma: the run's highest noise level: a keyframe starting above it (before the run) has no
    guaranteed levels.
    """

    def __init__(self, keyframes: HookKeyframes, sigma_of: Callable[[float], float], max_sigma: float) -> None:
        self.keyframes = keyframes.keyframes
        self.starts = [sigma_of(keyframe.start_percent) for keyframe in self.keyframes]
        self.max_sigma = max_sigma
        self.index = 0
        self.used = 0
        self.last_sigma: float | None = None

    def _guaranteed(self, index: int) -> int:
        return 0 if self.starts[index] > self.max_sigma else self.keyframes[index].guarantee_steps

    def strength(self, sigma: float) -> float:
        """The keyframe strength at noise level `sigma`; levels come in sampling order, a level seen
        last time counts once."""
        if not self.keyframes:
            return 1.0
        if sigma != self.last_sigma:
            if self.used >= self._guaranteed(self.index):
                for i in range(self.index + 1, len(self.keyframes)):
                    if self.starts[i] < sigma:
                        break
                    self.index, self.used = i, 0
                    if self._guaranteed(i) > 0:
                        break
            self.used += 1
            self.last_sigma = sigma
        return self.keyframes[self.index].strength


def _wrapped(network: nn.Module) -> nn.Module:
    """The module torch.compile's wrapper calls: its weights are the ones to patch, under their own names."""
    return getattr(network, "_orig_mod", network)


def hook_deltas(network: nn.Module, hook: LoraHook) -> Deltas:
    """The hook's LoRA matched to a denoiser's parameters (compiled or not).

    Raises :class:`HookError` for a network other than a U-Net, or a LoRA whose diffusion-model
    modules match none of its layers; modules that match nothing beside some that do are logged."""
    name = hook.name or hook.weights.path
    network = _wrapped(network)
    if not isinstance(getattr(network, "config", None), UNetConfig):
        raise HookError(f"LoRA hook {name}: hooks act on SD1.x/SD2.x/SDXL U-Nets; this model is another architecture")
    deltas, unmatched = hook.weights.deltas("unet", network.state_dict())
    if not deltas and unmatched:
        raise HookError(f"LoRA hook {name}: none of its {len(unmatched)} diffusion-model modules match this "
                        "model's layers (a LoRA for another architecture?)")
    if unmatched:
        logger.warning("LoRA hook %s: %d diffusion-model modules match no layer of this model and are ignored",
                       name, len(unmatched))
    return deltas


class HookSchedule:
    """The LoRA hooks of one sampling run on one denoiser: each hook's LoRA matched to the network's
    parameters when first needed, each keyframe walk, and the weight patches a network call runs with.

    network: the denoiser the guider calls (already carrying the model's own patches; compiled or
    not); sigma_of: the model's percent -> sigma.
    """

    def __init__(self, network: nn.Module, sigma_of: Callable[[float], float]) -> None:
        self.network = _wrapped(network)
        self.sigma_of = sigma_of
        self._deltas: dict[int, Deltas] = {}
        self._cursors: dict[tuple[int, HookKeyframes], KeyframeCursor] = {}
        self._max_sigma: float | None = None

    def strength(self, hook: LoraHook, sigma: float) -> float:
        """The hook's model strength at noise level `sigma`: strength_model times its keyframe's."""
        if self._max_sigma is None:
            self._max_sigma = sigma  # the first level a run evaluates is its highest
        key = (id(hook.ref), hook.keyframes)
        if key not in self._cursors:
            self._cursors[key] = KeyframeCursor(hook.keyframes, self.sigma_of, self._max_sigma)
        return hook.strength_model * self._cursors[key].strength(sigma)

    def patches(self, hooks: Sequence[LoraHook], sigma: float) -> WeightPatches:
        """The weight patches of `hooks` at noise level `sigma` (a hook at strength 0 adds none)."""
        patches = WeightPatches()
        for hook in hooks:
            strength = self.strength(hook, sigma)
            if id(hook.weights) not in self._deltas:
                self._deltas[id(hook.weights)] = hook_deltas(self.network, hook)
            deltas = self._deltas[id(hook.weights)]
            if strength != 0.0 and deltas:
                patches = patches.plus(deltas, strength)
        return patches

    @contextlib.contextmanager
    def applied(self, hooks: Sequence[LoraHook], sigma: float) -> Iterator[None]:
        """Within the block the network holds its weights plus the hooks' patches at `sigma`."""
        patches = self.patches(hooks, sigma) if hooks else WeightPatches()
        if not len(patches):
            yield
            return
        with patching.patched(self.network, patches):
            yield
