"""Train the tiny-shapes "outlined" LoRA (kohya format) on the frozen base model.

Run from the repository root after :mod:`training.train_base`: ``python -m training.train_lora``.
The style: shapes drawn as outlines instead of filled, which the base model never saw. Trigger:
the word "outlined" at the end of a caption, "a red circle on a blue background, outlined" (last,
so the words before it encode as the base model knows them). Low-rank deltas sit on the
U-Net's attention, feed-forward, projection and ResBlock conv weights and on the text encoder's
attention and MLP weights; an eighth of each batch is plain data (filled, no trigger word). The
style comes with the LoRA rather than the word: loaded, it outlines plain prompts too (measured in
training/README.md). Written with :func:`nodegraph_diffusion.architectures.lora.kohya_state_dict`.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from nodegraph_diffusion.architectures.stable_diffusion import load_checkpoint
from nodegraph_diffusion.architectures.lora import kohya_state_dict, load_lora
from nodegraph_diffusion.weights.patching import WeightPatches, patched

from . import shapes
from .architecture import CHECKPOINT_PATH, LORA_PATH, STATE_DIR, UNET_CONFIG, PromptEncoder, configure_torch
from .export import LICENSE, compare_samples, trained_base
from .sampling import TinyModel, generate
from .train_base import DiffusionLoss, cached_latents, encode_latents
from .loop import Schedule, save_atomically, train_steps
from .train_vae import DATASET_SEED, DATASET_SIZE, images_to_tensor, outlined_renders

logger = logging.getLogger(__name__)

SEED = 41
STEPS = 800
BATCH = 32
PLAIN_PER_BATCH = 4
LR = 4e-3
WARMUP = 20
RANK = 8
UNET_TARGETS = re.compile(
    r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|in_layers\.2|out_layers\.3)\.weight$"
)
TEXT_TARGETS = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")


class LoraAdapter:
    """Low-rank deltas added to chosen Linear/Conv2d weights through forward hooks (base untouched).

    down: (r, in[, kh, kw]) random; up: (out, r[, 1, 1]) zero, so training starts at the base model.
    The output of a patched layer becomes ``layer(x) + strength * up(down(x))``, which equals the
    layer with weight ``W + strength * up @ down``: what the kohya file means with alpha = rank.
    """

    def __init__(self, module: nn.Module, pattern: re.Pattern[str], rank: int, generator: torch.Generator) -> None:
        self.factors: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.strength = 1.0
        self._handles = []
        for name, param in module.named_parameters():
            if not pattern.search(name):
                continue
            layer = module.get_submodule(name[: -len(".weight")])
            if isinstance(layer, nn.Linear):
                down = torch.randn(rank, layer.in_features, generator=generator) / math.sqrt(layer.in_features)
                up = torch.zeros(layer.out_features, rank)
            elif isinstance(layer, nn.Conv2d):
                fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator) / math.sqrt(fan_in)
                up = torch.zeros(layer.out_channels, rank, 1, 1)
            else:
                raise TypeError(f"cannot put a LoRA on {name} ({type(layer).__name__})")
            pair = (nn.Parameter(down), nn.Parameter(up))
            self.factors[name] = pair
            self._handles.append(layer.register_forward_hook(self._hook(layer, *pair)))

    def _hook(self, layer: nn.Module, down: nn.Parameter, up: nn.Parameter):
        def add_delta(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            if isinstance(layer, nn.Conv2d):
                delta = F.conv2d(F.conv2d(x, down, stride=layer.stride, padding=layer.padding), up)
            else:
                delta = F.linear(F.linear(x, down), up)
            return output + self.strength * delta
        return add_delta

    def parameters(self) -> Iterator[nn.Parameter]:
        for down, up in self.factors.values():
            yield down
            yield up

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{name}|{role}": t.detach().clone() for name, pair in self.factors.items()
                for role, t in zip(("down", "up"), pair)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, (down, up) in self.factors.items():
                down.copy_(state[f"{name}|down"])
                up.copy_(state[f"{name}|up"])

    def kohya_factors(self) -> dict[str, tuple[Tensor, Tensor, float]]:
        """parameter name -> (down, up, alpha = rank): the input of :func:`kohya_state_dict`."""
        return {name: (down.detach().clone(), up.detach().clone(), float(down.shape[0]))
                for name, (down, up) in self.factors.items()}


def outlined_latents(vae: nn.Module) -> tuple[Tensor, list[str]]:
    """Latents and captions of the outlined training renders (cached in ``STATE_DIR``)."""
    path = STATE_DIR / "outlined_latents.pt"
    data = outlined_renders()
    if path.exists():
        return torch.load(path), data.captions
    latents = encode_latents(vae, images_to_tensor(data.images))
    torch.save(latents, path)
    return latents, data.captions


def train(steps: int = STEPS) -> tuple[TinyModel, LoraAdapter, LoraAdapter]:
    configure_torch()
    base = trained_base()
    for module in (base.unet, base.text_encoder, base.vae):
        module.requires_grad_(False)
    styled, styled_captions = outlined_latents(base.vae)
    plain = cached_latents()
    plain_captions = shapes.render_dataset(DATASET_SIZE, DATASET_SEED, cache_dir=STATE_DIR,
                                           with_silhouettes=True).captions
    prompts = PromptEncoder()
    generator = torch.Generator().manual_seed(SEED)
    unet_lora = LoraAdapter(base.unet, UNET_TARGETS, RANK, generator)
    text_lora = LoraAdapter(base.text_encoder, TEXT_TARGETS, RANK, generator)
    params = [*unet_lora.parameters(), *text_lora.parameters()]
    logger.info("LoRA on %d U-Net and %d text-encoder weights, %d parameters", len(unet_lora.factors),
                len(text_lora.factors), sum(p.numel() for p in params))
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    loss_fn = DiffusionLoss()

    def step_fn(_step: int) -> tuple[Tensor, float, str]:
        styled_index = torch.randint(len(styled), (BATCH - PLAIN_PER_BATCH,), generator=generator)
        plain_index = torch.randint(len(plain), (PLAIN_PER_BATCH,), generator=generator)
        x0 = torch.cat([styled[styled_index], plain[plain_index]])
        captions = [styled_captions[int(i)] for i in styled_index] + [plain_captions[int(i)] for i in plain_index]
        t = torch.randint(0, 1000, (BATCH,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        context = prompts.encode(base.text_encoder, prompts.ids(captions))
        loss = loss_fn(base.unet(loss_fn.noisy(x0, noise, t), t.float(), context), noise, t)
        return loss, float(loss.detach()), ""

    outcome = train_steps("LoRA", STATE_DIR / "lora.pt", Schedule(steps, LR, WARMUP, log_every=25, save_every=100),
                          optimizer, {"unet": unet_lora, "text": text_lora, "generator": generator}, step_fn)
    save_atomically({"unet": unet_lora.state_dict(), "text": text_lora.state_dict(), "loss": outcome.running_loss,
                     "seconds": outcome.seconds}, STATE_DIR / "lora_final.pt")
    return base, unet_lora, text_lora


def export_lora(unet_lora: LoraAdapter, text_lora: LoraAdapter, path=LORA_PATH) -> int:
    """Write the kohya file (fp16) and return its size in bytes."""
    state = kohya_state_dict(unet_lora.kohya_factors(), {"clip_l": text_lora.kohya_factors()}, "sd1", UNET_CONFIG)
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK),
                                          "ss_tag": shapes.TRIGGER_WORD, "license": LICENSE,
                                          "description": "tiny-shapes 'outlined' style; trigger word: outlined"})
    return path.stat().st_size


def lora_patches(path, model: TinyModel, strength: float) -> tuple[WeightPatches, WeightPatches]:
    """The product's view of a LoRA file: (U-Net patches, text-encoder patches) at ``strength``."""
    lora = load_lora(path)
    unet_deltas, unet_unmatched = lora.deltas("unet", model.unet.state_dict())
    text_deltas, text_unmatched = lora.deltas("clip_l", model.text_encoder.state_dict())
    if unet_unmatched or text_unmatched:
        raise RuntimeError(f"{path}: LoRA modules match nothing: {(unet_unmatched + text_unmatched)[:5]}")
    return WeightPatches().plus(unet_deltas, strength), WeightPatches().plus(text_deltas, strength)


def generate_with_lora(path, model: TinyModel, strength: float, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """Sample with the LoRA file applied through the product's patching, (B, 64, 64, 3) uint8."""
    unet_patches, text_patches = lora_patches(path, model, strength)
    with patched(model.unet, unet_patches), patched(model.text_encoder, text_patches):
        return generate(model, prompts, seeds)


def export_trained() -> int:
    base = trained_base()
    state = torch.load(STATE_DIR / "lora_final.pt")
    generator = torch.Generator().manual_seed(SEED)
    unet_lora = LoraAdapter(base.unet, UNET_TARGETS, RANK, generator)
    text_lora = LoraAdapter(base.text_encoder, TEXT_TARGETS, RANK, generator)
    unet_lora.load_state_dict(state["unet"])
    text_lora.load_state_dict(state["text"])
    size = export_lora(unet_lora, text_lora)
    # The reload check: the file through the product's LoRA path samples like the hooks did.
    prompts = [shapes.caption_for(shapes.Combo(*combo), outlined=True)
               for combo in (("red", "circle", "blue"), ("white", "square", "green"))]
    seeds = [0, 1]
    hooked = generate(base, prompts, seeds)
    fresh = load_checkpoint(CHECKPOINT_PATH, device="cpu", dtype=torch.float32)
    product = TinyModel(fresh.unet, fresh.vae, fresh.text_encoders["clip_l"])
    from_file = generate_with_lora(LORA_PATH, product, 1.0, prompts, seeds)
    error = compare_samples(hooked, from_file, str(LORA_PATH))
    logger.info("wrote %s (%.2f MB); file vs training hooks mean pixel error %.2f", LORA_PATH, size / 2**20, error)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.steps)
    export_trained()


if __name__ == "__main__":
    main()
