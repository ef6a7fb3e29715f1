"""DiT (Peebles & Xie), the class-conditional diffusion transformer, in the facebookresearch/DiT key layout.

Module names equal the keys of the released ``DiT-XL-2-256x256.pt`` / ``DiT-XL-2-512x512.pt``:
``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp.0/2``, ``y_embedder.embedding_table``,
``blocks.N.{adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}``,
``final_layer.{adaLN_modulation.1, linear}``. Diffusers ``DiTTransformer2DModel`` weights go through
:func:`dit_keys_from_diffusers`; :func:`dit_config_from_shapes` reads the architecture off key names
and shapes alone.

Data flow: the latent (B, C, H, W) is cut into p x p patches, each a token, plus fixed 2-D sine/cosine
positions. One vector ``c = t_embedder(timestep) + y_embedder(class)`` modulates every block
(adaLN-Zero: a shift, scale and gate each for the attention and the MLP) and the final layer. The
class table has one row more than there are classes: the last is the null class that
classifier-free guidance runs the unconditional half with (:attr:`DiTConfig.null_class`).

What the output means: with learned sigma (every released model) it has 2C channels, first the noise
prediction eps, then the interpolation between the posterior-variance bounds of improved DDPM, which
only an ancestral DDPM sampler with learned variances reads. Trained with the linear beta schedule
(1e-4 to 0.02, 1000 steps: the DDPM/ADM one, not SD's scaled-linear), timesteps 0..999 enter as they
are; the released models use the SD VAE (4 channels, scale 0.18215).

Positions: the stored ``pos_embed`` is the sine/cosine table of the trained grid (sample_size / p a
side), never trained. It is not kept as a tensor: the table follows from the config and is made for
each grid the network meets. At the trained size that is the stored table; at any other size,
square or not, row i of a rows x cols grid sits at ``i * grid / rows`` (columns alike), so the grid
spans the trained positions (the rule diffusers applies to DiT at other sizes). A file's stored table
is checked against the config's grid when loading and then dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .timestep import timestep_embedding
from .transformer import (
    MLP_RATIO,
    TIMESTEP_FREQUENCY_DIM,
    EmbedderMLP,
    FinalLayer,
    FusedQKVAttention,
    Mlp,
    PatchEmbed,
    SincosPositions,
    modulated_residual,
    pad_to_patches,
    unpatchify,
)

# Head counts leave no trace in the weights. The released DiT and PixArt models: XL (1152 wide, the
# only PixArt size) has 16 heads of 72; L, B and S have 64-wide heads. Other widths assume 64.
RELEASED_NUM_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}
DEFAULT_HEAD_DIM = 64


class DiTConfigError(ValueError):
    """A DiT config is inconsistent, or a state dict's keys/shapes do not fit the DiT layout."""


class DiTMissingKeyError(DiTConfigError):
    """A state dict lacks a key the DiT layout needs; ``key`` names it."""

    def __init__(self, key: str, hint: str = "") -> None:
        self.key = key
        super().__init__(
            f"DiT state dict has no {key!r}; is it a class-conditional DiT in the facebookresearch/DiT layout?"
            + (f" {hint}" if hint else "")
        )


class DiTInputError(ValueError):
    """The inputs of a DiT forward do not fit the model (names what was expected)."""


def num_heads_for_width(width: int, error: type[ValueError] = DiTConfigError) -> int:
    """The head count of a DiT-family model of this width (see :data:`RELEASED_NUM_HEADS`)."""
    if width in RELEASED_NUM_HEADS:
        return RELEASED_NUM_HEADS[width]
    if width % DEFAULT_HEAD_DIM:
        raise error(f"width {width} is neither a released DiT width nor a multiple of {DEFAULT_HEAD_DIM}-wide heads; "
                    "pass num_heads")
    return width // DEFAULT_HEAD_DIM


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a class-conditional DiT. Defaults are DiT-XL/2 at 256x256 pixels.

    ``sample_size`` is the latent side the model was trained at (256 px / 8 = 32; 64 for the 512
    model): its positional grid is ``sample_size / patch_size`` a side. ``num_classes`` counts the
    real classes; the label table has one more row, the null class. ``learn_sigma``: the output has
    twice the input channels (eps, then the variance interpolation).
    """

    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    num_classes: int = 1000
    learn_sigma: bool = True
    sample_size: int = 32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise DiTConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise DiTConfigError(f"hidden_size {self.hidden_size} is not a multiple of 4 (2-D sine/cosine positions)")
        if self.sample_size % self.patch_size:
            raise DiTConfigError(f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_classes < 1:
            raise DiTConfigError(f"num_classes must be at least 1, got {self.num_classes}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        """Patches a side of the trained latent (the stored positional table's grid)."""
        return self.sample_size // self.patch_size

    @property
    def null_class(self) -> int:
        """The label of the unconditional ("null") class: the table's last row."""
        return self.num_classes


def check_stored_positions(module: nn.Module, grid: int, error: type[ValueError]) -> None:
    """Let `module` load files that store their fixed positional table as ``pos_embed``.

    The table is made from the config (:class:`SincosPositions`), so the stored copy is not loaded;
    its shape is checked against the config's grid (a wrong ``sample_size`` shows here) and the key
    removed before torch matches keys, so loading is as strict as ever for every other key.
    """

    def hook(_module: nn.Module, state_dict: dict, prefix: str, *_args: object) -> None:
        stored = state_dict.pop(prefix + "pos_embed", None)
        if stored is None:
            return
        width = stored.shape[-1]
        if stored.ndim != 3 or stored.shape[1] != grid * grid:
            raise error(
                f"pos_embed {tuple(stored.shape)} is not the (1, {grid * grid}, {width}) table of the configured "
                f"{grid}x{grid}-patch grid; the config's sample_size does not fit these weights"
            )

    module.register_load_state_dict_pre_hook(hook)


# --------------------------------------------------------------------------- blocks


class LabelEmbedder(nn.Module):
    """The class table: num_classes + 1 rows (the last is the null class), one width-vector each."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        """labels: (B,) integers in [0, num_classes] -> (B, D)."""
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Self-attention and MLP, each an adaLN-Zero residual branch modulated by c."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        # Index 0 is the parameter-free SiLU, keeping the original's ``adaLN_modulation.1`` key.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = FusedQKVAttention(dim, num_heads)
        self.mlp = Mlp(dim, MLP_RATIO * dim, dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, L, D), c: (B, D) -> (B, L, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = modulated_residual(x, self.attn, shift_msa, scale_msa, gate_msa)
        return modulated_residual(x, self.mlp, shift_mlp, scale_mlp, gate_mlp)


# --------------------------------------------------------------------------- the model


class DiT(nn.Module):
    """The class-conditional DiT denoiser: latent, timestep and ImageNet class -> eps (and variance)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, width)
        self.t_embedder = EmbedderMLP(TIMESTEP_FREQUENCY_DIM, width)
        self.y_embedder = LabelEmbedder(config.num_classes, width)
        self.blocks = nn.ModuleList(DiTBlock(width, config.num_heads) for _ in range(config.depth))
        self.final_layer = FinalLayer(width, config.patch_size, config.out_channels)
        self.positions = SincosPositions(width, base_size=config.grid_size)
        check_stored_positions(self, config.grid_size, DiTConfigError)

    def forward(self, x: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        """x: (B, C, H, W) latent; timesteps: (B,) training timesteps (0..999, fractional allowed);
        class_labels: (B,) integers, :attr:`DiTConfig.null_class` for the unconditional half of
        classifier-free guidance -> (B, out_channels, H, W): eps, then (learned sigma) the variance
        interpolation.

        H and W need not be multiples of the patch size: the latent is padded up circularly and
        the output cropped back. See the module docstring for positions at untrained sizes.
        """
        self._check_inputs(x, timesteps, class_labels)
        height, width = x.shape[-2:]
        p = self.config.patch_size
        x = pad_to_patches(x, p)
        rows, cols = x.shape[-2] // p, x.shape[-1] // p

        tokens = self.x_embedder(x) + self.positions(rows, cols, x.device).to(x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps, TIMESTEP_FREQUENCY_DIM).to(tokens.dtype))
        c = c + self.y_embedder(class_labels)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.final_layer(tokens, c), rows, cols, p, height, width)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, class_labels: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise DiTInputError(f"x: expected (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        batch = x.shape[0]
        if timesteps.shape != (batch,):
            raise DiTInputError(f"timesteps: expected ({batch},), got {tuple(timesteps.shape)}")
        if class_labels.shape != (batch,) or class_labels.is_floating_point() or class_labels.is_complex():
            raise DiTInputError(
                f"class_labels: expected ({batch},) integers, got {tuple(class_labels.shape)} {class_labels.dtype}"
            )
        # One host sync per step; an out-of-range label would otherwise be a device-side assert.
        low, high = int(class_labels.min()), int(class_labels.max())
        if low < 0 or high > cfg.null_class:
            raise DiTInputError(
                f"class_labels: expected classes 0..{cfg.num_classes - 1} or the null class {cfg.null_class}, "
                f"got values in {low}..{high}"
            )


# --------------------------------------------------------------------------- config from shapes

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str, hint: str = "") -> tuple[int, ...]:
    if key not in shapes:
        raise DiTMissingKeyError(key, hint)
    return tuple(int(n) for n in shapes[key])


def is_dit_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys (no prefix) are a class-conditional DiT in the original layout."""
    keys = set(keys)
    return {
        "x_embedder.proj.weight",
        "y_embedder.embedding_table.weight",
        "blocks.0.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.weight",
    } <= keys


def dit_config_from_shapes(
    shapes: Mapping[str, Sequence[int]], *, sample_size: int | None = None, num_heads: int | None = None
) -> DiTConfig:
    """The :class:`DiTConfig` of an original-layout state dict, from key names and shapes alone.

    ``sample_size`` comes from the stored ``pos_embed`` grid; weights without it (converted from
    diffusers, whose ``config.json`` has ``sample_size``) need it passed. ``num_heads`` defaults to
    the rule of :func:`num_heads_for_width`. A missing key raises :class:`DiTMissingKeyError`.
    """
    hidden_size, in_channels, patch_size, patch_size_w = _shape(shapes, "x_embedder.proj.weight")
    if patch_size != patch_size_w:
        raise DiTConfigError(f"x_embedder.proj.weight has non-square patches {patch_size}x{patch_size_w}")

    if "pos_embed" in shapes:
        positions = _shape(shapes, "pos_embed")[1]
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise DiTConfigError(f"pos_embed has {positions} positions, not a square grid")
        if sample_size is not None and sample_size != grid * patch_size:
            raise DiTConfigError(f"sample_size {sample_size} was given, but pos_embed is a {grid}x{grid}-patch grid")
        sample_size = grid * patch_size
    elif sample_size is None:
        raise DiTMissingKeyError("pos_embed", "Without it, pass sample_size (the trained latent side).")

    frequency_dim = _shape(shapes, "t_embedder.mlp.0.weight")[1]
    if frequency_dim != TIMESTEP_FREQUENCY_DIM:
        raise DiTConfigError(
            f"t_embedder.mlp.0.weight reads {frequency_dim} frequencies, expected {TIMESTEP_FREQUENCY_DIM}"
        )
    table_rows = _shape(shapes, "y_embedder.embedding_table.weight")[0]
    if table_rows < 2:
        raise DiTConfigError(f"y_embedder.embedding_table has {table_rows} row(s): no class besides the null class")

    out_features = _shape(shapes, "final_layer.linear.weight")[0]
    out_channels, rest = divmod(out_features, patch_size * patch_size)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise DiTConfigError(
            f"final_layer.linear.weight has {out_features} outputs: not {patch_size}x{patch_size} patches of "
            f"{in_channels} or {2 * in_channels} channels"
        )

    blocks = sorted({int(m.group(1)) for key in shapes if (m := _BLOCK_KEY.match(key))})
    if not blocks:
        raise DiTMissingKeyError("blocks.0.adaLN_modulation.1.weight")
    if blocks != list(range(len(blocks))):
        raise DiTConfigError(f"blocks indices are not consecutive: {blocks}")
    depth = len(blocks)
    _shape(shapes, f"blocks.{depth - 1}.adaLN_modulation.1.weight")
    _shape(shapes, f"blocks.{depth - 1}.attn.qkv.weight")

    return DiTConfig(
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads if num_heads is not None else num_heads_for_width(hidden_size),
        num_classes=table_rows - 1,
        learn_sigma=out_channels == 2 * in_channels,
        sample_size=sample_size,
    )


# --------------------------------------------------------------------------- diffusers key mapping

# diffusers' DiTTransformer2DModel names -> the original's (names as in diffusers' convert_dit_to_diffusers.py).
_DIFFUSERS_TOP_LEVEL = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",  # (shift, scale) in both
    "proj_out_2": "final_layer.linear",
}
# The original's single timestep and class embedder, copied into every diffusers block.
_DIFFUSERS_SHARED = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}
_DIFFUSERS_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def is_diffusers_dit_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are a diffusers ``DiTTransformer2DModel``."""
    keys = set(keys)
    return {
        "pos_embed.proj.weight",
        "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
        "proj_out_2.weight",
    } <= keys


def dit_keys_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``DiTTransformer2DModel`` state dict in the original DiT layout (no prefix).

    diffusers keeps a copy of the one timestep/class embedder in every block (``norm1.emb``); they
    become the single ``t_embedder`` / ``y_embedder``, and copies that differ (weights trained in
    diffusers, where each copy learns on its own) raise :class:`DiTConfigError`, since the original
    layout cannot hold them. q/k/v are fused into ``qkv``. The result has no ``pos_embed`` (diffusers
    does not store it; the network does not need it). An unknown key raises rather than being dropped.
    """
    converted: dict[str, Tensor] = {}
    shared_from: dict[str, str] = {}
    qkv_parts: dict[str, dict[int, Tensor]] = {}
    for key, tensor in state_dict.items():
        if key == "pos_embed.pos_embed":
            converted["pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        if module in _DIFFUSERS_TOP_LEVEL:
            converted[f"{_DIFFUSERS_TOP_LEVEL[module]}.{param}"] = tensor
            continue
        match = _DIFFUSERS_BLOCK_KEY.match(key)
        if not match:
            raise DiTConfigError(f"diffusers DiT state dict: no original-layout name for {key!r}")
        block, module, param = match.groups()
        if module in _DIFFUSERS_SHARED:
            target = f"{_DIFFUSERS_SHARED[module]}.{param}"
            if target not in converted:
                converted[target], shared_from[target] = tensor, key
            elif not (tensor.is_meta or converted[target].is_meta or torch.equal(tensor, converted[target])):
                raise DiTConfigError(
                    f"diffusers DiT state dict: {key!r} differs from {shared_from[target]!r}; the original layout "
                    f"has one {target.rsplit('.', 2)[0]} for all blocks"
                )
        elif module in _DIFFUSERS_BLOCK:
            converted[f"blocks.{block}.{_DIFFUSERS_BLOCK[module]}.{param}"] = tensor
        elif module in _DIFFUSERS_QKV:
            qkv_parts.setdefault(f"blocks.{block}.attn.qkv.{param}", {})[_DIFFUSERS_QKV.index(module)] = tensor
        else:
            raise DiTConfigError(f"diffusers DiT state dict: no original-layout name for {key!r}")

    for fused_key, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            raise DiTConfigError(f"diffusers DiT state dict: {fused_key!r} lacks one of its q/k/v parts")
        converted[fused_key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return converted
