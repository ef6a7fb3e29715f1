"""LoRA hooks (ComfyUI's hook nodes) on tiny random models: a hooked conditioning is evaluated by the
U-Net with the hook's LoRA merged at strength_model times its keyframe's strength for that step
(checked against the model carrying the LoRA as a plain patch), unhooked conditionings by the base
model; keyframes interpolate and are walked as ComfyUI's formulas and rules say; SetClipHooks
encodes as the LoRA's text-encoder part applied; the nodes refuse what they cannot do."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from nodegraph.node import CancelToken, RunContext
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.lora import kohya_state_dict, load_lora
from nodegraph_diffusion.components import TextEncoders
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.hooks import (
    CreateHookKeyframe,
    CreateLoraHook,
    InterpolateHookKeyframes,
    SetClipHooks,
    SetConditioningPairProperties,
    SetHookKeyframes,
)
from nodegraph_diffusion.sampling.guidance import CFGGuider, CondEntry, GuidanceError, check_conditioning
from nodegraph_diffusion.sampling.hooks import (
    HookKeyframe,
    HookKeyframes,
    HookSchedule,
    KeyframeCursor,
    LoraHook,
    clip_schedule,
    combined,
    interpolated_keyframes,
)
from nodegraph_diffusion.sampling.model_sampling import ModelSampling
from nodegraph_diffusion.sampling.schedules import sigmas_normal
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.clip_tokenizer import CLIPTokenizer
from nodegraph_diffusion.weights import patching

from _random_weights import randomize_
from _unet_fixtures import CONTEXT_DIM, TINY_SD1, TINY_SDXL

SAMPLING = ModelSampling.for_prediction("eps")
CLIP_CONFIG = TextEncoderConfig(width=24, layers=2, heads=2, intermediate_size=48, projection_dim=16)
# U-Net weights the test LoRA patches: attention, a 1x1 projection and a 3x3 conv (LoCon).
UNET_PARAMS = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
               "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
               "middle_block.1.proj_in.weight", "output_blocks.3.0.in_layers.2.weight")
CLIP_PARAMS = ("text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.1.mlp.fc1.weight")


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None)


def factors(module: torch.nn.Module, params: tuple[str, ...], seed: int) -> dict:
    """Random (down, up, alpha) of rank 2 for each parameter (LoCon factors for 3x3 convs)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    out = {}
    for name in params:
        shape = shapes[name]
        down = 0.3 * torch.randn((2, *shape[1:]), generator=generator)
        up = 0.3 * torch.randn((shape[0], 2, *([1, 1] if len(shape) == 4 else [])), generator=generator)
        out[name] = (down, up, 3.0)
    return out


@pytest.fixture(scope="module")
def unet() -> UNet:
    return randomize_(UNet(TINY_SD1), seed=1)


def tiny_clip(seed: int = 2) -> TextEncoders:
    return TextEncoders({"clip_l": randomize_(CLIPTextEncoder(CLIP_CONFIG), seed=seed)}, CLIPTokenizer.from_default(),
                        ModelFamily.SD1)


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory, unet) -> Path:
    """A kohya SD1 LoRA for the tiny U-Net and the tiny CLIP-L, in a loras folder."""
    folder = tmp_path_factory.mktemp("models") / "loras"
    folder.mkdir()
    state = kohya_state_dict(factors(unet, UNET_PARAMS, seed=3),
                             {"clip_l": factors(tiny_clip().encoders["clip_l"], CLIP_PARAMS, seed=4)},
                             ModelFamily.SD1, unet_config=TINY_SD1)
    save_file(state, folder / "hook.safetensors")
    return folder / "hook.safetensors"


def text(seed: int) -> CondEntry:
    return CondEntry(context=torch.randn(1, 77, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)))


def max_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- keyframes


@pytest.mark.parametrize("method", ["linear", "ease_in", "ease_out", "ease_in_out"])
def test_interpolated_keyframes_follow_comfyuis_formulas(method):
    # comfy/hooks.py InterpolationMethod.get_weights, written out with numpy over t = linspace(0, 1, n).
    start, end, count, p0, p1 = 0.2, 1.7, 7, 0.1, 0.65
    t = np.linspace(0.0, 1.0, count)
    diff = end - start
    expected = {"linear": np.linspace(start, end, count), "ease_in": diff * np.power(t, 2) + start,
                "ease_out": diff * (1 - np.power(1 - t, 2)) + start,
                "ease_in_out": diff * ((1 - np.cos(t * np.pi)) / 2) + start}[method]
    keyframes = interpolated_keyframes(start, end, method, p0, p1, count)
    assert np.abs(np.array([k.strength for k in keyframes]) - expected).max() < 1e-12
    assert np.abs(np.array([k.start_percent for k in keyframes]) - np.linspace(p0, p1, count)).max() < 1e-12
    assert [k.guarantee_steps for k in keyframes] == [1] + [0] * (count - 1)


def test_keyframe_walk_takes_the_last_keyframe_started_at_each_level():
    # The corpus file's keyframes: strengths 0 .. 1 from 0 to 50 % of sampling, 5 of them.
    keyframes = HookKeyframes().plus(*interpolated_keyframes(0.0, 1.0, "linear", 0.0, 0.5, 5))
    sigmas = sigmas_normal(SAMPLING.schedule, 10)[:-1].tolist()
    cursor = KeyframeCursor(keyframes, SAMPLING.percent_to_sigma, max(sigmas))
    got = []
    for sigma in sigmas:
        got += [cursor.strength(sigma), cursor.strength(sigma)]  # a level seen again counts once
    # Without guaranteed levels (the first keyframe starts before the run): the last keyframe whose
    # start sigma is at or above the level.
    starts = [SAMPLING.percent_to_sigma(k.start_percent) for k in keyframes.keyframes]
    expected = [keyframes.keyframes[max(i for i, s in enumerate(starts) if s >= sigma)].strength for sigma in sigmas]
    assert got[::2] == got[1::2] == expected
    assert expected[0] == 0.0 and expected[-1] == 1.0 and len(set(expected)) == 5  # each keyframe is reached


def test_guaranteed_levels_hold_a_keyframe_before_the_next_is_taken():
    # CreateHookKeyframe's keyframes hold one level each: at a level past both later keyframes the walk
    # still stops on the first of them, and takes the second at the next level.
    keyframes = HookKeyframes().plus(HookKeyframe(0.1, 0.0), HookKeyframe(0.2, 0.1), HookKeyframe(0.3, 0.2))
    sigmas = [SAMPLING.sigma_max, SAMPLING.percent_to_sigma(0.5), SAMPLING.percent_to_sigma(0.6),
              SAMPLING.percent_to_sigma(0.7)]
    cursor = KeyframeCursor(keyframes, SAMPLING.percent_to_sigma, sigmas[0])
    assert [cursor.strength(s) for s in sigmas] == [0.1, 0.2, 0.3, 0.3]
    # Keyframes that hold no level are passed over in one go.
    free = HookKeyframes(tuple(HookKeyframe(k.strength, k.start_percent, 0) for k in keyframes.keyframes))
    cursor = KeyframeCursor(free, SAMPLING.percent_to_sigma, sigmas[0])
    assert [cursor.strength(s) for s in sigmas] == [0.1, 0.3, 0.3, 0.3]


def test_keyframes_keep_the_order_they_were_added_in_among_equal_starts():
    keyframes = HookKeyframes().plus(HookKeyframe(1.0, 0.5), HookKeyframe(2.0, 0.0), HookKeyframe(3.0, 0.5))
    assert [k.strength for k in keyframes.keyframes] == [2.0, 1.0, 3.0]


def test_clip_schedule_splits_sampling_where_a_hooks_strength_changes(lora_path):
    lora = load_lora(lora_path)
    steady = LoraHook(lora, 1.0, 1.0, HookKeyframes().plus(HookKeyframe(0.5, 0.0), HookKeyframe(0.5, 0.3)))
    stepped = LoraHook(lora, 1.0, 1.0, HookKeyframes().plus(HookKeyframe(2.0, 0.4), HookKeyframe(3.0, 0.7)))
    plain = LoraHook(lora, 1.0, 1.0)
    assert clip_schedule([steady, plain]) == [((0.0, 1.0), (0.5, 1.0))]  # equal strengths make one part
    # A hook is at 1 before its first keyframe; parts are cut wherever any hook changes.
    assert clip_schedule([steady, stepped]) == [((0.0, 0.4), (0.5, 1.0)), ((0.4, 0.7), (0.5, 2.0)),
                                                ((0.7, 1.0), (0.5, 3.0))]


# --------------------------------------------------------------------------- the model side


def test_hooked_entry_sees_the_lora_at_its_keyframe_strength_and_unhooked_the_base(unet, lora_path):
    lora = load_lora(lora_path)
    keyframes = HookKeyframes().plus(*interpolated_keyframes(0.0, 1.0, "ease_in", 0.0, 0.6, 4))
    hook = LoraHook(lora, 0.8, 1.0, keyframes, name="hook")
    positive, negative = text(5).with_(hooks=(hook,)), text(6)
    base = {name: p.detach().clone() for name, p in unet.state_dict().items()}
    guider = CFGGuider(unet, SAMPLING, [positive], [negative], cfg=5.0)
    deltas, unmatched = lora.deltas("unet", unet.state_dict())
    assert len(deltas) == len(UNET_PARAMS) and not unmatched
    sigmas = sigmas_normal(SAMPLING.schedule, 8)[:-1].tolist()
    starts = [SAMPLING.percent_to_sigma(k.start_percent) for k in keyframes.keyframes]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    reference = CFGGuider(unet, SAMPLING, [positive.with_(hooks=())], [negative], cfg=5.0)
    worst, lora_effect, seen = 0.0, 0.0, set()
    for step, sigma in enumerate(sigmas):
        level = torch.tensor([sigma])
        strength = 0.8 * keyframes.keyframes[max(i for i, s in enumerate(starts) if s >= sigma)].strength
        seen.add(strength)
        with torch.no_grad():
            hooked, plain = guider._predictions(x * sigma, level, [guider.positive, guider.negative])
            with patching.patched(unet, patching.WeightPatches().plus(deltas, strength)):
                merged = reference._predictions(x * sigma, level, [reference.positive])[0]
            base_out = reference._predictions(x * sigma, level, [reference.negative])[0]
            unhooked = reference._predictions(x * sigma, level, [reference.positive])[0]
        worst = max(worst, max_err(hooked, merged))
        lora_effect = max(lora_effect, max_err(merged, unhooked))
        assert torch.equal(plain, base_out), step  # the unhooked negative: the base model, bit for bit
        assert guider.model_calls == 2 * (step + 1)  # hooked and unhooked entries never share a call
    print(f"hooked entry vs the LoRA merged at its keyframe strength: max {worst:.2e} over {len(sigmas)} levels")
    assert worst <= 1e-5 and lora_effect > 1e-2  # the LoRA changes the prediction
    assert len(seen) == 4 and 0.0 in seen  # strength 0 at the start, then every keyframe
    assert all(torch.equal(base[name], p) for name, p in unet.state_dict().items())  # weights restored


def test_entries_with_the_same_hooks_share_a_call_and_hooks_add_to_the_models_own_lora(unet, lora_path):
    lora = load_lora(lora_path)
    hook = LoraHook(lora, 1.0, 1.0, name="hook")
    hooks = (hook,)
    positive, negative = text(5).with_(hooks=hooks), text(6).with_(hooks=hooks)
    deltas, _ = lora.deltas("unet", unet.state_dict())
    own = patching.WeightPatches().plus(deltas, 0.5)  # the model carries the same LoRA at 0.5 itself
    x, level = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)), torch.tensor([3.0])
    with torch.no_grad():
        with patching.patched(unet, own):
            guider = CFGGuider(unet, SAMPLING, [positive], [negative], cfg=7.0)
            got = guider._predictions(x, level, [guider.positive, guider.negative])
            assert guider.model_calls == 1
        with patching.patched(unet, own.plus(deltas, 1.0)):
            plain = CFGGuider(unet, SAMPLING, [positive.with_(hooks=())], [negative.with_(hooks=())], cfg=7.0)
            expected = plain._predictions(x, level, [plain.positive, plain.negative])
    # (W + 0.5 d) + d against W + 1.5 d: float32 rounding apart.
    worst = max(max_err(a, b) for a, b in zip(got, expected))
    print(f"hooks on the model's own LoRA vs both merged: max {worst:.2e}")
    assert worst <= 1e-5


def test_hooks_patch_the_module_a_compiled_network_wraps(unet, lora_path):
    lora = load_lora(lora_path)
    hook = LoraHook(lora, 0.5, 1.0, name="hook")
    compiled = torch.compile(unet)  # compiled when first called: nothing runs here
    check_conditioning(compiled, [text(1).with_(hooks=(hook,))])
    schedule = HookSchedule(compiled, SAMPLING.percent_to_sigma)
    deltas, _ = lora.deltas("unet", unet.state_dict())
    name = next(iter(deltas))
    weight = unet.get_parameter(name)
    before = weight.detach().clone()
    with schedule.applied((hook,), 1.0):
        expected = before + 0.5 * deltas[name].tensor(weight.shape, torch.float32, "cpu")
        assert max_err(weight.detach(), expected) < 1e-6
    assert torch.equal(weight.detach(), before)


def test_hooks_that_cannot_act_on_the_model_are_refused(tmp_path, lora_path):
    sdxl_lora = tmp_path / "sdxl.safetensors"
    sdxl_unet = UNet(TINY_SDXL)
    save_file(kohya_state_dict(factors(sdxl_unet, ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",), 1),
                               {}, ModelFamily.SDXL), sdxl_lora)
    wrong = LoraHook(load_lora(sdxl_lora), 1.0, 1.0, name="sdxl.safetensors")
    with pytest.raises(GuidanceError, match="sdxl.safetensors: none of its 1 diffusion-model modules match"):
        check_conditioning(UNet(TINY_SD1), [text(1).with_(hooks=(wrong,))])


def test_combining_hooks_keeps_each_hook_once(lora_path):
    lora = load_lora(lora_path)
    a, b = LoraHook(lora, 1.0, 1.0), LoraHook(lora, 0.5, 1.0)
    scheduled = a.with_keyframes(HookKeyframes().plus(HookKeyframe(0.5)))
    assert combined((a, b), (scheduled, b)) == (a, b)


# --------------------------------------------------------------------------- nodes


def test_hook_nodes_build_scheduled_hooks_on_conditionings(tmp_path, monkeypatch, lora_path):
    monkeypatch.setenv("NODEGRAPH_MODELS", str(lora_path.parent.parent))
    c = ctx(tmp_path)
    hooks = CreateLoraHook().run(CreateLoraHook.Inputs(name="hook.safetensors", strength_model=0.7,
                                                       strength_clip=0.3), c).hooks
    assert len(hooks) == 1 and (hooks[0].strength_model, hooks[0].strength_clip) == (0.7, 0.3)
    # Strengths 0 and 0 add nothing; a chain keeps the earlier hooks first.
    assert CreateLoraHook().run(CreateLoraHook.Inputs(name="hook.safetensors", strength_model=0, strength_clip=0,
                                                      previous=hooks), c).hooks == hooks
    chained = CreateLoraHook().run(CreateLoraHook.Inputs(name="hook.safetensors", previous=hooks), c).hooks
    assert chained[0] is hooks[0] and len(chained) == 2
    single = CreateHookKeyframe().run(CreateHookKeyframe.Inputs(strength=0.5, start_percent=0.2), c).keyframes
    keyframes = InterpolateHookKeyframes().run(InterpolateHookKeyframes.Inputs(
        strength_start=0.0, strength_end=1.0, start_percent=0.0, end_percent=0.5, count=3, previous=single),
        c).keyframes
    assert [(k.start_percent, k.strength) for k in keyframes.keyframes] == [(0.0, 0.0), (0.2, 0.5), (0.25, 0.5),
                                                                            (0.5, 1.0)]
    scheduled = SetHookKeyframes().run(SetHookKeyframes.Inputs(hooks=chained, keyframes=keyframes), c).hooks
    assert all(hook.keyframes == keyframes for hook in scheduled) and scheduled[0].ref is chained[0].ref
    positive, negative = (text(1),), (text(2), text(3))
    pair = SetConditioningPairProperties().run(SetConditioningPairProperties.Inputs(
        positive=positive, negative=negative, hooks=scheduled, timesteps=(0.1, 0.9)), c)
    assert all(e.hooks == scheduled and (e.start, e.end) == (0.1, 0.9) for e in pair.positive + pair.negative)
    assert all(e.mask is None for e in pair.positive + pair.negative)  # no mask: strength changes nothing
    with pytest.raises(InputError, match="mask bounds"):
        SetConditioningPairProperties().run(SetConditioningPairProperties.Inputs(
            positive=positive, negative=negative, set_cond_area="mask bounds", mask=torch.ones(8, 8)), c)


def test_clip_hooks_encode_as_the_loras_text_encoder_part_applied(tmp_path, lora_path):
    lora = load_lora(lora_path)
    clip = tiny_clip()
    hook = LoraHook(lora, 1.0, 0.6, HookKeyframes().plus(HookKeyframe(0.25)), name="hook")
    node, c = SetClipHooks(), ctx(tmp_path)
    hooked = node.run(SetClipHooks.Inputs(clip=clip, hooks=(hook,)), c).clip
    deltas, unmatched = lora.deltas("clip_l", clip.encoders["clip_l"].state_dict())
    assert len(deltas) == len(CLIP_PARAMS) and not unmatched
    # As LoadLora applies the text-encoder part at strength_clip; without schedule_clip the keyframes
    # are left to the model side.
    expected = clip.with_patches({"clip_l": deltas}, 0.6).encode("a red ball")
    got = hooked.encode("a red ball")
    plain = clip.encode("a red ball")
    assert torch.equal(got.context, expected.context) and torch.equal(got.pooled, expected.pooled)
    assert max_err(got.context, plain.context) > 1e-3
    assert got.hooks == (hook,) and plain.hooks == ()
    # schedule_clip: the keyframe's strength (here one for all of sampling) applies too.
    scheduled = node.run(SetClipHooks.Inputs(clip=clip, hooks=(hook,), schedule_clip=True), c).clip
    assert torch.equal(scheduled.encode("a red ball").context,
                       clip.with_patches({"clip_l": deltas}, 0.6 * 0.25).encode("a red ball").context)
    # apply_to_conds off: the encoding changes, the conditioning carries no hooks.
    quiet = node.run(SetClipHooks.Inputs(clip=clip, hooks=(hook,), apply_to_conds=False), c).clip.encode("a red ball")
    assert torch.equal(quiet.context, expected.context) and quiet.hooks == ()
    # A later SetClipHooks replaces the text-encoder hooks; the model's own LoRA stays.
    other = LoraHook(lora, 1.0, -1.0, name="other")
    own = clip.with_patches({"clip_l": deltas}, 0.2)
    replaced = node.run(SetClipHooks.Inputs(clip=node.run(SetClipHooks.Inputs(clip=own, hooks=(hook,)), c).clip,
                                            hooks=(other,)), c).clip.encode("x")
    assert torch.equal(replaced.context, clip.with_patches({"clip_l": deltas}, 0.2).with_patches(
        {"clip_l": deltas}, -1.0).encode("x").context) and replaced.hooks == (other,)
    # No hooks: the encoders as they were.
    assert node.run(SetClipHooks.Inputs(clip=clip), c).clip is clip


def test_clip_schedule_that_changes_during_sampling_is_refused(tmp_path, lora_path):
    hook = LoraHook(load_lora(lora_path), 1.0, 1.0, HookKeyframes().plus(HookKeyframe(0.0), HookKeyframe(1.0, 0.5)),
                    name="hook")
    with pytest.raises(InputError, match="schedule_clip"):
        SetClipHooks().run(SetClipHooks.Inputs(clip=tiny_clip(), hooks=(hook,), schedule_clip=True), ctx(tmp_path))
    assert math.isclose(clip_schedule([hook])[1][1][0], 1.0)
