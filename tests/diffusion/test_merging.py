"""Model merging (ModelMergeSimple/Add/Subtract/Blocks/SD1/SDXL, CLIPMerge*) on tiny random models: the
merged weights are ComfyUI's formulas (strength_model * W1 + strength_patch * W2, each model with the
LoRAs it carried) per weight and per block; nothing is copied or changed in the inputs; the merged
model samples as a U-Net holding the merged weights does. ModelSamplingContinuousEDM's maths against
its formulas."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from nodegraph.node import CancelToken, RunContext
from nodegraph_diffusion.architectures.detection import ModelFamily
from nodegraph_diffusion.architectures.stable_diffusion import LatentFormat
from nodegraph_diffusion.components import DiffusionModel, Latent, TextEncoders
from nodegraph_diffusion.networks.unet import UNet
from nodegraph_diffusion.nodes import continuous, merging
from nodegraph_diffusion.nodes.common import InputError
from nodegraph_diffusion.nodes.sampling import KSampler
from nodegraph_diffusion.sampling import schedules as S
from nodegraph_diffusion.sampling.guidance import CondEntry
from nodegraph_diffusion.sampling.model_sampling import ModelSampling, Prediction
from nodegraph_diffusion.text.clip import CLIPTextEncoder, TextEncoderConfig
from nodegraph_diffusion.text.clip_tokenizer import CLIPTokenizer
from nodegraph_diffusion.weights import merging as weight_merging
from nodegraph_diffusion.weights.patching import WeightPatches, patched

from _random_weights import randomize_
from _unet_fixtures import CONTEXT_DIM, TINY_INPAINT, TINY_SD1, TINY_SDXL

LATENT = LatentFormat(4, 0.18215, 0.0, 8)


def ctx(tmp_path: Path) -> RunContext:
    return RunContext(node_id="n", device="cpu", output_dir=tmp_path, log=logging.getLogger("test"),
                      cancel_token=CancelToken(), report=lambda kind, data: None)


def model(config=TINY_SD1, seed: int = 0, name: str = "") -> DiffusionModel:
    family = ModelFamily.SDXL if config.adm_in_channels else ModelFamily.SD1
    return DiffusionModel(randomize_(UNet(config), seed=seed), family, ModelSampling.for_prediction("eps"), LATENT,
                          name=name or f"m{seed}")


class Delta:
    """A fixed additive delta (a LoRA's low-rank product, written out)."""

    def __init__(self, value: Tensor) -> None:
        self.source, self.value = "lora", value

    def tensor(self, shape, dtype, device) -> Tensor:
        return self.value.to(device, dtype).reshape(shape)


def lora(network: nn.Module, seed: int, every: int = 3) -> dict[str, Delta]:
    generator = torch.Generator().manual_seed(seed)
    return {name: Delta(0.1 * torch.randn(p.shape, generator=generator))
            for i, (name, p) in enumerate(network.named_parameters()) if i % every == 0}


def weights(m: DiffusionModel) -> dict[str, Tensor]:
    """The weights m runs with (its patches applied), copied."""
    with m.patched_network() as network:
        return {name: p.detach().clone() for name, p in network.named_parameters()}


def snapshot(network: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in network.named_parameters()}


def assert_close(got: dict[str, Tensor], expected: dict[str, Tensor], names=None) -> None:
    for name in names or expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-5), name


def test_weighted_sum_add_and_subtract_are_comfyuis_formulas_with_each_models_loras(tmp_path):
    m1, m2 = model(seed=1), model(seed=2)
    m1 = m1.with_patch(lora(m1.network, seed=3), 0.7)  # LoRAs applied before the merge count
    m2 = m2.with_patch(lora(m2.network, seed=4, every=2), -1.5)
    w1, w2 = weights(m1), weights(m2)
    before1, before2 = snapshot(m1.network), snapshot(m2.network)

    merged = merging.MergeModels().run(merging.MergeModels.Inputs(model1=m1, model2=m2, ratio=0.3), ctx(tmp_path)).model
    assert merged.network is m1.network and merged.sampling is m1.sampling  # model1's, not a copy
    assert_close(weights(merged), {k: 0.3 * w1[k] + 0.7 * w2[k] for k in w1})

    added = merging.AddModels().run(merging.AddModels.Inputs(model1=m1, model2=m2), ctx(tmp_path)).model
    assert_close(weights(added), {k: w1[k] + w2[k] for k in w1})

    diff = merging.SubtractModels().run(merging.SubtractModels.Inputs(model1=m1, model2=m2, multiplier=0.5),
                                        ctx(tmp_path)).model
    assert_close(weights(diff), {k: 0.5 * (w1[k] - w2[k]) for k in w1})

    # Non-destructive: both inputs run with their own weights, and their stored weights never changed.
    assert_close(weights(m1), w1)
    assert_close(weights(m2), w2)
    for network, before in ((m1.network, before1), (m2.network, before2)):
        for name, p in network.named_parameters():
            assert torch.equal(p, before[name]), name


def test_merges_chain_and_a_later_lora_adds_to_the_merged_weights(tmp_path):
    a, b, c = model(seed=1), model(seed=2), model(seed=3)
    wa, wb, wc = weights(a), weights(b), weights(c)
    run = lambda m1, m2, ratio: merging.MergeModels().run(  # noqa: E731
        merging.MergeModels.Inputs(model1=m1, model2=m2, ratio=ratio), ctx(tmp_path)).model
    ab = run(a, b, 0.6)
    abc = run(ab, c, 0.25)
    extra = lora(a.network, seed=9)
    final = abc.with_patch(extra, 2.0)
    expected = {k: 0.25 * (0.6 * wa[k] + 0.4 * wb[k]) + 0.75 * wc[k] for k in wa}
    assert_close(weights(abc), expected)
    assert_close(weights(final), {k: expected[k] + (2.0 * extra[k].value if k in extra else 0) for k in wa})
    # The same network on both sides (a model merged with a LoRA'd copy of itself).
    tuned = a.with_patch(extra, 1.0)
    self_merge = run(a, tuned, 0.5)
    assert_close(weights(self_merge), {k: wa[k] + (0.5 * extra[k].value if k in extra else 0) for k in wa})


def block_ratio_expected(name: str, ratios: dict[str, float], default: float) -> float:
    for prefix in sorted(ratios, key=len, reverse=True):
        if name.startswith(prefix):
            return ratios[prefix]
    return default


def test_merge_blocks_applies_each_ratio_to_its_prefix(tmp_path):
    m1, m2 = model(seed=1), model(seed=2)
    w1, w2 = weights(m1), weights(m2)
    merged = merging.MergeModelBlocks().run(merging.MergeModelBlocks.Inputs(
        model1=m1, model2=m2, input=0.2, middle=0.5, out=0.9), ctx(tmp_path)).model
    got = weights(merged)
    seen = set()
    for name in w1:
        part = name.split(".")[0]
        # ComfyUI matches by prefix: "out" takes out.* and output_blocks.*, others (time_embed) take input's.
        ratio = {"input_blocks": 0.2, "middle_block": 0.5, "output_blocks": 0.9, "out": 0.9}.get(part, 0.2)
        seen.add((part, ratio))
        assert torch.allclose(got[name], ratio * w1[name] + (1 - ratio) * w2[name], atol=1e-6), name
    assert seen == {("time_embed", 0.2), ("input_blocks", 0.2), ("middle_block", 0.5), ("output_blocks", 0.9),
                    ("out", 0.9)}


@pytest.mark.parametrize("node_class, config", [(merging.MergeModelBlocksSD1, TINY_SD1),
                                                (merging.MergeModelBlocksSDXL, TINY_SDXL)])
def test_per_block_merge_sets_each_blocks_ratio(tmp_path, node_class, config):
    m1, m2 = model(config, seed=1), model(config, seed=2)
    w1, w2 = weights(m1), weights(m2)
    names = [name for name in node_class.specs().inputs if name not in ("model1", "model2")]
    ratios = {name: round(0.03 * i + 0.01, 2) for i, name in enumerate(names)}
    merged = node_class().run(node_class.Inputs(model1=m1, model2=m2, **ratios), ctx(tmp_path)).model
    got = weights(merged)
    by_prefix = {prefix: ratios[merging.block_input_name(prefix)] for prefix in node_class.block_prefixes}
    used = set()
    for name in w1:
        ratio = block_ratio_expected(name, by_prefix, ratios["time_embed"])
        used.add(ratio)
        assert torch.allclose(got[name], ratio * w1[name] + (1 - ratio) * w2[name], atol=1e-6), name
    # Every block of the tiny U-Net (9 in, 3 middle, 9 out, the embeddings, out) had a ratio of its own.
    blocks = {".".join(name.split(".")[:2]) if "blocks" in name or "middle" in name else name.split(".")[0]
              for name in w1}
    assert len(used) == len(blocks)
    # input_blocks.1 is not input_blocks.10.. (SD1's block names end in a dot).
    assert by_prefix["input_blocks.1."] != by_prefix.get("input_blocks.10.", by_prefix["input_blocks.1."] + 1)


def test_add_difference_merge_keeps_the_inpainting_input_conv(tmp_path, caplog):
    inpaint, base, custom = model(TINY_INPAINT, seed=1), model(seed=2), model(seed=3)
    wi, wb, wc = weights(inpaint), weights(base), weights(custom)
    with caplog.at_level(logging.WARNING):
        diff = merging.SubtractModels().run(merging.SubtractModels.Inputs(model1=inpaint, model2=base, multiplier=1.0),
                                            ctx(tmp_path)).model
    assert "1 weight(s) of different shapes are not merged (input_blocks.0.0.weight)" in caplog.text
    result = merging.AddModels().run(merging.AddModels.Inputs(model1=diff, model2=custom), ctx(tmp_path)).model
    got = weights(result)
    assert torch.equal(got["input_blocks.0.0.weight"], wi["input_blocks.0.0.weight"])
    assert_close(got, {k: wi[k] - wb[k] + wc[k] for k in wi if k != "input_blocks.0.0.weight"})


def test_models_of_different_architectures_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="model2 is SDXL, model1 SD1.x: models of different architectures"):
        merging.MergeModels().run(merging.MergeModels.Inputs(model1=model(seed=1), model2=model(TINY_SDXL, seed=2)),
                                  ctx(tmp_path))
    # Modules with no weight of the same shape in common are named as of different architectures.
    with pytest.raises(weight_merging.MergeError, match="share no weight of the same name and shape"):
        weight_merging.merge_deltas(nn.Linear(3, 4), WeightPatches(), nn.Linear(4, 3), WeightPatches(),
                                    weight_merging.uniform(1.0, 1.0), source="test")


def test_merged_model_samples_as_a_unet_holding_the_merged_weights(tmp_path):
    m1, m2 = model(seed=1), model(seed=2)
    m1 = m1.with_patch(lora(m1.network, seed=3), 1.0)
    merged = merging.MergeModelBlocks().run(merging.MergeModelBlocks.Inputs(
        model1=m1, model2=m2, input=0.3, middle=0.6, out=0.8), ctx(tmp_path)).model
    reference = UNet(TINY_SD1).eval()
    reference.load_state_dict(weights(merged))
    plain = DiffusionModel(reference, ModelFamily.SD1, ModelSampling.for_prediction("eps"), LATENT)
    generator = torch.Generator().manual_seed(5)
    positive = (CondEntry(context=torch.randn(1, 7, CONTEXT_DIM, generator=generator)),)
    negative = (CondEntry(context=torch.randn(1, 7, CONTEXT_DIM, generator=generator)),)
    latent = Latent(torch.zeros(1, 4, 8, 8))

    def sample(m: DiffusionModel) -> Tensor:
        inputs = KSampler.Inputs(model=m, positive=positive, negative=negative, latent=latent, seed=3, steps=3,
                                 cfg=5.0, sampler_name="euler_ancestral", scheduler="karras")
        return KSampler().run(inputs, ctx(tmp_path)).latent.samples

    got, expected = sample(merged), sample(plain)
    assert torch.isfinite(got).all() and got.abs().max() > 0.1
    assert (got - expected).abs().max() < 1e-4
    assert (got - sample(m1)).abs().max() > 1e-2  # the merge changed the result


def text_encoders(seed: int) -> TextEncoders:
    config = TextEncoderConfig(vocab_size=64, width=32, layers=2, heads=2, intermediate_size=48, eos_token_id=63)
    return TextEncoders({"clip_l": randomize_(CLIPTextEncoder(config), seed=seed)}, CLIPTokenizer.from_default(),
                        ModelFamily.SD1)


def encoder_weights(clip: TextEncoders) -> dict[str, Tensor]:
    encoder = clip.encoders["clip_l"]
    with patched(encoder, clip.patches.get("clip_l", WeightPatches())):
        return {name: p.detach().clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize("node_class, extra, formula", [
    (merging.MergeTextEncoders, {"ratio": 0.25}, lambda a, b: 0.25 * a + 0.75 * b),
    (merging.AddTextEncoders, {}, lambda a, b: a + b),
    (merging.SubtractTextEncoders, {"multiplier": 2.0}, lambda a, b: 2.0 * (a - b)),
])
def test_text_encoder_merges_are_comfyuis_formulas(tmp_path, node_class, extra, formula):
    clip1, clip2 = text_encoders(1).with_clip_skip(2), text_encoders(2)
    w1, w2 = encoder_weights(clip1), encoder_weights(clip2)
    merged = node_class().run(node_class.Inputs(clip1=clip1, clip2=clip2, **extra), ctx(tmp_path)).clip
    assert merged.clip_skip == 2 and merged.encoders["clip_l"] is clip1.encoders["clip_l"]
    assert_close(encoder_weights(merged), {k: formula(w1[k], w2[k]) for k in w1})
    assert_close(encoder_weights(clip1), w1)


def test_text_encoders_without_a_shared_encoder_are_refused(tmp_path):
    clip2 = text_encoders(2)
    other = TextEncoders({"clip_g": clip2.encoders["clip_l"]}, clip2.tokenizer, ModelFamily.SDXL)
    with pytest.raises(InputError, match="share no encoder"):
        merging.AddTextEncoders().run(merging.AddTextEncoders.Inputs(clip1=text_encoders(1), clip2=other),
                                      ctx(tmp_path))


# --- ModelSamplingContinuousEDM ---------------------------------------------------------------------

def test_continuous_edm_sampling_formulas(tmp_path):
    m = model(seed=1)
    edm = continuous.ModelSamplingContinuousEDM()
    v = edm.run(edm.Inputs(model=m, sampling="v_prediction", sigma_max=120.0, sigma_min=0.002), ctx(tmp_path)).model
    assert v.network is m.network
    schedule = v.sampling.schedule
    assert isinstance(schedule, S.ContinuousSchedule) and schedule.sigmas.numel() == 1000
    assert schedule.sigma_max == pytest.approx(120.0) and schedule.sigma_min == pytest.approx(0.002)
    sigma = torch.tensor([80.0, 1.0, 0.01], dtype=torch.float64)
    assert torch.allclose(v.sampling.timestep(sigma), (0.25 * sigma.log()).float())
    assert torch.allclose(schedule.t_to_sigma(schedule.sigma_to_t(sigma)), sigma)
    # Log-linear table and progress (ComfyUI's percent_to_sigma): halfway is the geometric mean.
    assert torch.allclose(schedule.sigmas.log().diff(), torch.full((999,), math.log(120 / 0.002) / 999,
                                                                    dtype=torch.float64))
    assert schedule.percent_to_sigma(0.5) == pytest.approx(math.sqrt(120 * 0.002))
    assert schedule.percent_to_sigma(0.0) == math.inf and schedule.percent_to_sigma(1.0) == 0.0
    # normal = uniform in 0.25 ln(sigma) = exponential for this model; karras reads the new range.
    assert torch.allclose(S.sigmas_normal(schedule, 5), S.sigmas_exponential(5, 0.002, 120.0), rtol=1e-5)

    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = sigma.reshape(-1, 1, 1, 1)
    for name, sigma_data, sign in (("v_prediction", 1.0, -1.0), ("edm", 0.5, 1.0)):
        sampling = edm.run(edm.Inputs(model=m, sampling=name), ctx(tmp_path)).model.sampling
        assert sampling.sigma_data == sigma_data
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
        assert torch.allclose(sampling.denoised(x, sigma, out), c_skip * x + sign * c_out * out)
        assert torch.allclose(sampling.input_scale(sigma), 1 / (sigma**2 + sigma_data**2).sqrt())
    eps = edm.run(edm.Inputs(model=m, sampling="eps"), ctx(tmp_path)).model.sampling
    assert eps.prediction is Prediction.EPS and torch.allclose(eps.denoised(x, sigma, out), x - s * out)
    with pytest.raises(InputError, match="sigma_min < sigma_max"):
        edm.run(edm.Inputs(model=m, sigma_min=5.0, sigma_max=1.0), ctx(tmp_path))
