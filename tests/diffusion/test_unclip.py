"""Image prompts (unCLIP / SDXL revision): the cosine noise schedule and the noised image embedding
against diffusers (DDPMScheduler "squaredcos_cap_v2", StableUnCLIPImg2ImgPipeline.noise_image_embeddings),
several prompts merged as ComfyUI's unclip_adm, and how each U-Net takes them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nodegraph_diffusion.networks.unet import UNetConfig
from nodegraph_diffusion.sampling import schedules as S
from nodegraph_diffusion.sampling import unclip as U
from nodegraph_diffusion.sampling.guidance import CondEntry

D = 16


def embeds(seed: int, n: int = 1, width: int = D) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def noise(seed: int, width: int = D) -> torch.Tensor:
    return torch.randn(1, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parity
def test_cosine_schedule_is_diffusers_squaredcos_cap_v2() -> None:
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000).alphas_cumprod.double()
    ours = S.cosine_discrete_schedule().alphas_cumprod
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-9)
    # The 300th cumulative product written out.
    assert float(ours[299]) == pytest.approx(math.prod(
        1 - min(1 - math.cos(((i + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
                / math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2, 0.999) for i in range(300)), rel=1e-9)


@pytest.mark.parity
@pytest.mark.parametrize("level", [0, 50, 500, 999])
def test_noised_embedding_matches_diffusers_stable_unclip(level: int) -> None:
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    pipe = SimpleNamespace(image_normalizer=StableUnCLIPImageNormalizer(D),
                           image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    x, n = embeds(0, 2), torch.cat([noise(1), noise(2)])
    theirs = StableUnCLIPImg2ImgPipeline.noise_image_embeddings(pipe, x, level, noise=n)
    ours = U.noise_image_embedding(x, level, n)
    assert ours.shape == (2, 2 * D)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_one_prompt_is_its_noised_embedding_times_strength_with_the_seeded_noise() -> None:
    x = embeds(3)
    prompt = U.ImagePrompt(x, strength=0.7, noise_augmentation=0.25)
    assert U.noise_level(0.25) == 250 and U.noise_level(1.0) == 999
    expected = U.noise_image_embedding(x, 250, noise(42)) * 0.7
    assert torch.allclose(U.image_prompt_vector([prompt], seed=42), expected)
    assert not torch.allclose(U.image_prompt_vector([prompt], seed=43), expected)


def test_several_images_are_summed_and_noised_again_at_the_merge_level() -> None:
    """ComfyUI's unclip_adm: every image row of every prompt noised (each with the seed's first
    draw) and weighted, the sum's embedding half noised once more at the merge level."""
    a, b = embeds(4, 2), embeds(5)
    prompts = [U.ImagePrompt(a, 1.0, 0.1), U.ImagePrompt(b, 0.5, 0.0)]
    n = noise(9)
    parts = [U.noise_image_embedding(a[i:i + 1], 100, n) for i in range(2)] + [U.noise_image_embedding(b, 0, n) * 0.5]
    total = sum(parts)
    expected = U.noise_image_embedding(total[:, :D], 50, n)
    assert torch.allclose(U.image_prompt_vector(prompts, seed=9, merge_augmentation=0.05), expected, atol=1e-6)
    with pytest.raises(U.ImagePromptError, match="in \\[0, 1\\]"):
        U.noise_level(1.5)


UNCLIP_H = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                      num_heads=None, head_dim=32, context_dim=1024, use_linear_projection=True, adm_in_channels=2048)
SDXL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                  num_heads=None, head_dim=32, context_dim=2048, use_linear_projection=True, adm_in_channels=2816)
SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), context_dim=768)


def test_how_each_unet_takes_image_prompts() -> None:
    assert U.image_conditioning_of(UNCLIP_H, "sd2") == U.ImageConditioning("vector", 1024, 0.05)
    assert U.image_conditioning_of(SDXL, "sdxl") == U.ImageConditioning("pooled", None, 0.0)
    assert U.image_conditioning_of(SD1, "sd1") is None and U.image_conditioning_of(object(), "sd3") is None

    text = CondEntry(context=torch.zeros(1, 77, 1024))
    prompt = U.ImagePrompt(embeds(6, 1, 1024), 1.0, 0.0)
    plain, image = U.with_image_prompts(UNCLIP_H, "sd2", [text, text.with_(image_prompts=(prompt,))], seed=20)
    assert torch.equal(plain.y, torch.zeros(1, 2048))  # no image: zeros, as ComfyUI and diffusers' negative
    assert torch.equal(image.y, U.image_prompt_vector([prompt], seed=10)) and image.image_prompts == ()

    pooled, sizes = torch.randn(1, 1280), torch.randn(1, 1536)
    xl = CondEntry(context=torch.zeros(1, 77, 2048), pooled=pooled, y=torch.cat([pooled, sizes], 1))
    xl_prompt = U.ImagePrompt(embeds(7, 1, 1280), 2.0, 0.5)
    (revised,) = U.with_image_prompts(SDXL, "sdxl", [xl.with_(image_prompts=(xl_prompt,))], seed=3)
    vector = U.image_prompt_vector([xl_prompt], seed=-7, merge_augmentation=0.0)
    assert torch.equal(revised.pooled, vector[:, :1280])
    assert torch.equal(revised.y, torch.cat([vector[:, :1280], sizes], 1))
    assert U.with_image_prompts(SDXL, "sdxl", [xl], seed=3) == (xl,)

    with pytest.raises(U.ImagePromptError, match="takes none"):
        U.with_image_prompts(SD1, "sd1", [CondEntry(context=torch.zeros(1, 77, 768), image_prompts=(prompt,))], seed=0)
    with pytest.raises(U.ImagePromptError, match="width \\[1024\\] do not fit this model, which takes 1280"):
        U.with_image_prompts(SDXL, "sdxl", [xl.with_(image_prompts=(prompt,))], seed=0)
