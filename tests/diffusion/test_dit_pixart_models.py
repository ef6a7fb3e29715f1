"""DiT and PixArt-α/Σ as models the library detects, loads and guides: original-layout single files
(safetensors and DiT's pickled .pt), a whole PixArt file with VAE and T5, diffusers folders; the
linear beta schedule against diffusers'; the guided denoiser against diffusers' transformers at
several noise levels (DiT: class label and null class; PixArt: masked T5 states and the learned null
caption); PixArt's T5 conditioning; conditioning that does not fit refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from nodegraph_diffusion.architectures.detection import FileKind, ModelFamily, detect
from nodegraph_diffusion.architectures.transformers import load_text_encoder_file, load_transformer, model_sampling_for
from nodegraph_diffusion.components import MissingTextEncoderError, TextEncoders
from nodegraph_diffusion.networks.dit import DiT
from nodegraph_diffusion.networks.pixart import PixArt
from nodegraph_diffusion.sampling.guidance import (
    CFGGuider,
    CondEntry,
    GuidanceError,
    check_conditioning,
    fit_caption,
    learned_unconditional,
)
from nodegraph_diffusion.sampling.schedules import linear_discrete_schedule, sd_discrete_schedule
from nodegraph_diffusion.text.clip_tokenizer import CLIPTokenizer
from nodegraph_diffusion.text.t5 import T5Encoder
from nodegraph_diffusion.text.t5_tokenizer import T5Tokenizer
from nodegraph_diffusion.weights.loading import StateDictMismatchError

from _checkpoint_fixtures import write_safetensors
from _dit_fixtures import (
    DIT,
    DIT_FILE,
    PIXART_ALPHA,
    PIXART_ALPHA_ALL_IN_ONE,
    PIXART_ALPHA_FILE,
    PIXART_SIGMA,
    PIXART_SIGMA_FILE,
    T5_FILE,
    dit_reference,
    dit_weights,
    pixart_reference,
    t5_weights,
    vae_reference,
    write_dit_models,
)

PROMPT = "a (red:1.3) cube on a wooden table"
T5_WIDTH = PIXART_SIGMA.caption_dim
# Relative to the eps scale: the guided estimate is x - sigma * eps, sigma up to ~157.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dit_models(tmp_path_factory.mktemp("dit_models"))


def _pixart_clip(root: Path, family: ModelFamily) -> TextEncoders:
    encoders = load_text_encoder_file(root / "text_encoders" / T5_FILE, device="cpu")
    return TextEncoders(encoders=encoders, tokenizer=CLIPTokenizer.from_default(), family=family)


# --------------------------------------------------------------------------- schedule


def test_linear_beta_schedule_is_diffusers_linear_not_sds_scaled_linear() -> None:
    ours = linear_discrete_schedule()
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(ours.alphas_cumprod.float(), reference.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert ours.sigma_max == pytest.approx(157.4, abs=0.1)  # vs SD's 14.6: a different noise range
    assert sd_discrete_schedule().sigma_max == pytest.approx(14.61, abs=0.01)
    for family in (ModelFamily.DIT, ModelFamily.PIXART_ALPHA, ModelFamily.PIXART_SIGMA):
        sampling = model_sampling_for(family)
        torch.testing.assert_close(sampling.schedule.sigmas, ours.sigmas)
        # Table sigmas map to their own integer timesteps, which the networks take as they are.
        steps = torch.tensor([0, 37, 500, 999])
        torch.testing.assert_close(sampling.timestep(ours.sigmas[steps]), steps.float(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- detection and loading


@pytest.mark.parametrize(("folder", "name", "family", "components", "config", "scaling"), [
    ("checkpoints", DIT_FILE, ModelFamily.DIT, ["dit"], DIT, 0.18215),
    ("diffusion_models", PIXART_ALPHA_FILE, ModelFamily.PIXART_ALPHA, ["pixart"], PIXART_ALPHA, 0.18215),
    ("diffusion_models", PIXART_SIGMA_FILE, ModelFamily.PIXART_SIGMA, ["pixart"], PIXART_SIGMA, 0.13025),
    ("checkpoints", PIXART_ALPHA_ALL_IN_ONE, ModelFamily.PIXART_ALPHA, ["pixart", "vae", "t5xxl"], PIXART_ALPHA,
     0.18215),
])
def test_original_layout_files_are_detected_and_loaded(models, folder, name, family, components, config, scaling):
    path = models / folder / name
    detection = detect(path)
    kind = FileKind.CHECKPOINT if len(components) > 1 else FileKind.DIFFUSION_MODEL
    assert (detection.kind, detection.family, list(detection.components)) == (kind, family, components)
    assert not detection.unclaimed_keys
    loaded = load_transformer(path, device="cpu")
    assert loaded.network_config == config
    assert isinstance(loaded.network, DiT if family is ModelFamily.DIT else PixArt)
    assert (loaded.latent_format.channels, loaded.latent_format.downscale_factor) == (4, 8)
    assert loaded.latent_format.scaling_factor == pytest.approx(scaling)
    assert (loaded.vae is not None) == ("vae" in components)
    assert list(loaded.text_encoders) == [c for c in components if c == "t5xxl"]
    prefix = "model.diffusion_model." if kind is FileKind.CHECKPOINT else ""
    stored = {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}
    state = loaded.network.state_dict()
    assert set(state) == set(stored) - {"pos_embed"}  # the fixed table is made from the config
    for key, value in state.items():
        assert torch.equal(value, stored[key]), key


def test_dit_pickled_pt_file_as_released(tmp_path: Path) -> None:
    """facebookresearch/DiT ships DiT-XL-2-256x256.pt: a pickled state dict, read with weights_only."""
    weights = dit_weights(dit_reference())
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(weights, path)
    detection = detect(path)
    assert (detection.kind, detection.family) == (FileKind.DIFFUSION_MODEL, ModelFamily.DIT)
    loaded = load_transformer(path, device="cpu")
    assert loaded.network_config == DIT and loaded.network.config.null_class == 1000


def test_a_file_without_what_its_config_needs_is_named(tmp_path: Path) -> None:
    weights = dit_weights(dit_reference())
    del weights["pos_embed"]  # the trained size is read off the stored table
    path = write_safetensors(tmp_path / "dit-no-table.safetensors", weights, dtype=None)
    with pytest.raises(StateDictMismatchError, match=r"dit-no-table\.safetensors.*'pos_embed'.*sample_size"):
        load_transformer(path, device="cpu")


@torch.no_grad()
def test_diffusers_dit_folder_loads_and_matches_its_transformer(tmp_path: Path) -> None:
    reference = dit_reference(seed=5)
    folder = tmp_path / "DiT-tiny"
    reference.save_pretrained(folder / "transformer")
    vae_reference().save_pretrained(folder / "vae")
    detection = detect(folder)
    assert (detection.kind, detection.family, list(detection.components)) == (
        FileKind.CHECKPOINT, ModelFamily.DIT, ["dit", "vae"])
    loaded = load_transformer(folder, device="cpu")
    # The sample size comes from config.json (diffusers stores no positional table).
    assert loaded.network_config == DIT and loaded.vae is not None
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([999.0, 12.0]), torch.tensor([207, 1000])
    # The reference keeps the original's timestep frequencies (dit_reference): the weights' own.
    expected = reference(x, timestep=t, class_labels=labels).sample
    assert (loaded.network(x, t, labels) - expected).abs().max() <= TOLERANCE


def _write_pixart_folder(folder: Path, reference, pipeline: str | None, t5: bool = True) -> None:
    reference.save_pretrained(folder / "transformer")
    if t5:
        (folder / "text_encoder").mkdir(parents=True)
        write_safetensors(folder / "text_encoder" / "model.safetensors", t5_weights(), dtype=None)
    if pipeline is not None:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))


@torch.no_grad()
def test_diffusers_pixart_folders_take_the_family_from_the_pipeline(tmp_path: Path) -> None:
    sigma = pixart_reference(PIXART_SIGMA, seed=8)
    _write_pixart_folder(tmp_path / "sigma", sigma, "PixArtSigmaPipeline")
    detection = detect(tmp_path / "sigma")
    assert (detection.kind, detection.family, list(detection.components)) == (
        FileKind.CHECKPOINT, ModelFamily.PIXART_SIGMA, ["pixart", "t5xxl"])
    loaded = load_transformer(tmp_path / "sigma", device="cpu")
    assert loaded.network_config == dataclasses.replace(PIXART_SIGMA, null_caption=False)
    assert loaded.latent_format.scaling_factor == pytest.approx(0.13025)
    assert isinstance(loaded.text_encoders["t5xxl"], T5Encoder)
    x = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 7, PIXART_SIGMA.caption_dim, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    expected = sigma(x, encoder_hidden_states=context, timestep=torch.tensor([400.0]), encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert (loaded.network(x, torch.tensor([400.0]), context, mask) - expected).abs().max() <= TOLERANCE
    with pytest.raises(GuidanceError, match="no null caption"):
        learned_unconditional(loaded.network)

    # α at 256/512 px has no micro-conditions: only the pipeline class tells it from Σ.
    alpha_256 = dataclasses.replace(PIXART_SIGMA, max_token_length=120, sample_size=32, interpolation_scale=0.5)
    _write_pixart_folder(tmp_path / "alpha", pixart_reference(alpha_256, seed=9), "PixArtAlphaPipeline", t5=False)
    loaded = load_transformer(tmp_path / "alpha", device="cpu")
    assert loaded.family is ModelFamily.PIXART_ALPHA
    assert loaded.network_config == dataclasses.replace(alpha_256, null_caption=False)
    assert loaded.latent_format.scaling_factor == pytest.approx(0.18215)
    _write_pixart_folder(tmp_path / "unnamed", pixart_reference(alpha_256, seed=9), None, t5=False)
    assert detect(tmp_path / "unnamed").family is ModelFamily.PIXART_SIGMA  # nothing tells: the current one


# --------------------------------------------------------------------------- guidance against diffusers


def _sigmas(sampling) -> list[float]:
    table = sampling.schedule.sigmas
    return [float(table[999]), float(table[500]), float(sampling.schedule.t_to_sigma(torch.tensor(37.25)))]


@torch.no_grad()
def test_dit_guided_denoiser_matches_diffusers_with_the_null_class(models) -> None:
    loaded = load_transformer(models / "checkpoints" / DIT_FILE, device="cpu")
    reference = dit_reference()
    sampling = loaded.sampling
    positive, negative = CondEntry(class_label=207), learned_unconditional(loaded.network)
    assert negative.class_label == 1000 and negative.context is None
    cfg = 4.0
    guider = CFGGuider(loaded.network, sampling, [positive], [negative], cfg)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for level in _sigmas(sampling):
        sigma = torch.full((2,), level)
        got = guider(x, sigma)
        t = sampling.timestep(sigma)
        scaled = x / (level**2 + 1) ** 0.5
        out = reference(torch.cat([scaled, scaled]), timestep=torch.cat([t, t]),
                        class_labels=torch.tensor([207, 207, 1000, 1000])).sample[:, :4]  # eps; the rest is variance
        cond, uncond = out.chunk(2)
        expected = x - level * (uncond + cfg * (cond - uncond))
        assert ((got - expected) / level).abs().max() <= TOLERANCE, level
    assert guider.model_calls == 3  # class and null class in one call per step


@torch.no_grad()
def test_pixart_guided_denoiser_matches_diffusers_with_mask_and_null_caption(models) -> None:
    loaded = load_transformer(models / "diffusion_models" / PIXART_SIGMA_FILE, device="cpu")
    reference = pixart_reference(PIXART_SIGMA, 23)
    clip = _pixart_clip(models, ModelFamily.PIXART_SIGMA)
    positive = clip.encode(PROMPT)
    negative = learned_unconditional(loaded.network)
    assert positive.context.shape == (1, 300, PIXART_SIGMA.caption_dim) and negative.context.shape[1] == 300
    cfg = 4.5
    guider = CFGGuider(loaded.network, loaded.sampling, [positive], [negative], cfg)
    x = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(4))  # non-square: 3 x 5 patches
    for level in _sigmas(loaded.sampling):
        sigma = torch.full((1,), level)
        got = guider(x, sigma)
        t = loaded.sampling.timestep(sigma)
        scaled = x / (level**2 + 1) ** 0.5
        added = {"resolution": None, "aspect_ratio": None}
        cond = reference(scaled, encoder_hidden_states=positive.context, timestep=t,
                         encoder_attention_mask=positive.context_mask, added_cond_kwargs=added).sample[:, :4]
        uncond = reference(scaled, encoder_hidden_states=negative.context, timestep=t,
                           added_cond_kwargs=added).sample[:, :4]
        expected = x - level * (uncond + cfg * (cond - uncond))
        assert ((got - expected) / level).abs().max() <= TOLERANCE, level
    assert guider.model_calls == 3  # prompt and null caption batched: same length after padding


@torch.no_grad()
def test_a_sigma_padded_prompt_on_an_alpha_model_is_fitted_to_its_120_tokens(models) -> None:
    loaded = load_transformer(models / "diffusion_models" / PIXART_ALPHA_FILE, device="cpu")
    sigma_padded = _pixart_clip(models, ModelFamily.PIXART_SIGMA).encode(PROMPT)
    alpha_padded = _pixart_clip(models, ModelFamily.PIXART_ALPHA).encode(PROMPT)
    assert sigma_padded.context.shape[1] == 300 and alpha_padded.context.shape[1] == 120
    fitted = fit_caption(sigma_padded, 120)
    assert fitted.context.shape[1] == 120 and torch.equal(fitted.context_mask, alpha_padded.context_mask)
    negative = learned_unconditional(loaded.network)
    x, sigma = torch.randn(1, 4, 10, 6, generator=torch.Generator().manual_seed(5)), torch.full((1,), 3.0)
    one = CFGGuider(loaded.network, loaded.sampling, [sigma_padded], [negative], 3.0)
    got = one(x, sigma)
    assert one.model_calls == 1  # fitted to the null caption's length: one batched call
    expected = CFGGuider(loaded.network, loaded.sampling, [alpha_padded], [negative], 3.0)(x, sigma)
    assert (got - expected).abs().max() <= 1e-5
    # A context that is shorter and unmasked gets masked padding; the result is the same.
    trimmed = CondEntry(context=alpha_padded.context[:, : int(alpha_padded.context_mask.sum())])
    padded = fit_caption(trimmed, 120)
    assert padded.context_mask.sum() == trimmed.context.shape[1] and padded.context.shape[1] == 120
    unmasked = CFGGuider(loaded.network, loaded.sampling, [trimmed], [negative], 3.0)(x, sigma)
    assert (unmasked - expected).abs().max() <= 1e-5


# --------------------------------------------------------------------------- PixArt's T5 conditioning


@torch.no_grad()
def test_pixart_t5_conditioning_masks_pads_and_truncates(models) -> None:
    clip = _pixart_clip(models, ModelFamily.PIXART_SIGMA)
    encoder = clip.encoders["t5xxl"]
    entry = clip.encode("a cube on a table")
    ids = T5Tokenizer.from_default().tokenize_prompt("a cube on a table").ids  # text + EOS, unpadded
    assert entry.context.shape == (1, 300, T5_WIDTH) and entry.context_mask.shape == (1, 300)
    assert entry.context_mask.sum() == len(ids) and entry.context_mask[0, : len(ids)].all()
    # Masking makes the padding inert: the prompt's states are T5's states of the prompt alone.
    alone = encoder(torch.tensor([ids]))
    assert (entry.context[:, : len(ids)] - alone).abs().max() <= 1e-5
    assert entry.pooled is None and entry.y is None and entry.class_label is None

    weighted = clip.encode("a (cube:1.5) on a table")
    assert (weighted.context[:, : len(ids)] - entry.context[:, : len(ids)]).abs().max() > 1e-3

    long_prompt = " ".join(["word"] * 400)
    alpha = _pixart_clip(models, ModelFamily.PIXART_ALPHA).encode(long_prompt)
    assert alpha.context.shape[1] == 120 and bool(alpha.context_mask.all())  # truncated at α's length, EOS kept
    with pytest.raises(MissingTextEncoderError, match="T5"):
        TextEncoders(encoders={}, tokenizer=CLIPTokenizer.from_default(), family=ModelFamily.PIXART_ALPHA).encode("x")



# --------------------------------------------------------------------------- refusals


def test_conditioning_that_does_not_fit_is_refused_by_name(models) -> None:
    dit = load_transformer(models / "checkpoints" / DIT_FILE, device="cpu").network
    pixart = load_transformer(models / "diffusion_models" / PIXART_SIGMA_FILE, device="cpu").network
    text = CondEntry(context=torch.zeros(1, 300, T5_WIDTH))
    with pytest.raises(GuidanceError, match="class labels, not text"):
        check_conditioning(dit, [text])
    with pytest.raises(GuidanceError, match="classes are 0..999, its null class is 1000"):
        check_conditioning(dit, [CondEntry(class_label=1001)])
    with pytest.raises(GuidanceError, match="class-label conditioning"):
        check_conditioning(pixart, [CondEntry(class_label=3)])
    with pytest.raises(GuidanceError, match=r"\(1, T, 32\)"):
        check_conditioning(pixart, [CondEntry(context=torch.zeros(1, 77, 64))])
    with pytest.raises(GuidanceError, match="does not fit its text states"):
        check_conditioning(pixart, [text.with_(context_mask=torch.ones(1, 12))])
    check_conditioning(dit, [CondEntry(class_label=0), learned_unconditional(dit)])
    check_conditioning(pixart, [text, learned_unconditional(pixart)])

