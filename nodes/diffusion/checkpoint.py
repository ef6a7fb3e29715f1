"""Open Stable Diffusion weight files, tell what they hold from key names and shapes alone, and build the models with no random init and no extra copy.

Files read:

- ``.safetensors``: header parsed first (detection needs no tensor data), tensors mapped from the
  file (:mod:`safetensors_io`).
- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: only through ``torch.load(weights_only=True, mmap=True)``;
  a pickle that would run code is refused (:class:`UnsafeCheckpointError`) and nothing in it runs.
- diffusers folders (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, optionally
  ``scheduler/``, each with ``config.json`` and weights), renamed through the model modules' mappings.

What a file is (:func:`detect`) comes from its keys and shapes: SD1.x, SD2.x, SDXL base, SDXL
refiner (each possibly an inpainting model: ``in_channels == 2 * out_channels + 1``), ControlNet
(SD1/SD2/SDXL), standalone U-Net, VAE, text encoder, LoRA and textual-inversion embedding files.
Family tests look at layout, never at sizes alone, so scaled-down models of a layout are detected
and loaded like the full ones:

- SDXL-type U-Net: it has the ``label_emb`` (ADM) vector embedding. Base vs refiner: the refiner
  carries only the OpenCLIP bigG encoder (``conditioner.embedders.0.model.``), the base CLIP-L
  and bigG; a U-Net alone is told by its ADM width (2560 refiner, else base).
- SD2 vs SD1: the text encoder is OpenCLIP (``cond_stage_model.model.``) vs HF CLIP
  (``cond_stage_model.transformer.``); a U-Net alone by its transformer ``proj_in`` being linear
  (SD2) or a 1x1 conv (SD1).

Prediction type (eps vs v) is not in the weights. In order of precedence: the ``prediction``
argument; a ``v_pred`` marker key in the file; ``modelspec.prediction_type`` in safetensors
metadata; a sidecar ``<name>.yaml`` next to the file (LDM config, ``parameterization: "v"``; no
such line means eps); a diffusers folder's ``scheduler/scheduler_config.json``; for ``.ckpt`` files
``global_step == 875000`` (the SD2-base 512 release, eps); else the family default: v for SD2.x
non-inpainting (the 768-v layout is the common SD2 file; give ``prediction="eps"`` for SD2-base),
eps for everything else. :attr:`LoadedCheckpoint.prediction_source` says which rule decided.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from . import controlnet as controlnet_module
from . import text_encoder as text_encoder_module
from . import unet as unet_module
from . import vae as vae_module
from .devices import Component, pick_device, resolve_dtype
from .safetensors_io import CheckpointError, SafetensorsFile

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "WrongModelKindError",
    "StateDictMismatchError",
    "ModelFamily",
    "Prediction",
    "FileKind",
    "ComponentKeys",
    "Detection",
    "LatentFormat",
    "LoadedCheckpoint",
    "LoadedVAE",
    "LoadedControlNet",
    "open_weights",
    "ShapeOnlyWeights",
    "detect",
    "detect_from_shapes",
    "load_checkpoint",
    "load_vae",
    "load_controlnet",
]


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call code to load; refused, nothing in it was run."""


class WrongModelKindError(CheckpointError):
    """The file holds a different kind of model than the one asked for."""


class StateDictMismatchError(CheckpointError):
    """A component's weights do not fit the architecture derived for it (names the keys)."""


class ModelFamily(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"

    @property
    def latent_family(self) -> str:
        """The family name the VAE and text-encoder modules key their tables by."""
        return "sdxl" if self is ModelFamily.SDXL_REFINER else self.value


class Prediction(str, Enum):
    EPS = "eps"
    V = "v"


class FileKind(str, Enum):
    CHECKPOINT = "checkpoint"  # a diffusion U-Net, usually with VAE and text encoders
    UNET = "unet"  # a diffusion U-Net alone
    CONTROLNET = "controlnet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    LORA = "lora"
    EMBEDDING = "embedding"  # textual inversion
    UNKNOWN = "unknown"


# --------------------------------------------------------------------------- reading files

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFile(Protocol):
    """What detection and loading need from a weight file."""

    path: Path

    @property
    def metadata(self) -> dict[str, str]: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dtypes(self) -> dict[str, torch.dtype]: ...

    def tensor(self, name: str) -> Tensor: ...


class TorchPickleFile:
    """A torch.save file read with ``weights_only=True`` and ``mmap=True``: tensors and plain data only.

    Lightning-style ``{"state_dict": {...}, "global_step": N, ...}`` files are unwrapped; plain
    scalars beside the state dict are kept in :attr:`extras`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(
                self.path,
                "not a zip-format torch file (legacy pre-1.6 torch.save format, or not a torch file at all); "
                "only zip-format files can be memory-mapped and checked for code. Convert it to .safetensors.",
            )
        try:
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                self.path,
                "refused to unpickle: the file needs code beyond tensors and plain data to load "
                f"(torch.load weights_only said: {_first_line(exc)}). Nothing in it was run. If you trust "
                "its source, convert it to .safetensors in an isolated environment.",
            ) from None
        except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(self.path, f"cannot read as a torch file (truncated or corrupt?): {_first_line(exc)}") from exc
        state_dict = loaded
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            state_dict = loaded["state_dict"]
        if not isinstance(state_dict, dict):
            raise CheckpointError(self.path, f"holds a {type(state_dict).__name__}, expected a dict of tensors")
        self._tensors: dict[str, Tensor] = {}
        self.extras: dict[str, object] = {}
        for key, value in state_dict.items():
            if isinstance(value, Tensor):
                self._tensors[str(key)] = value
            else:
                self.extras[str(key)] = value
        if loaded is not state_dict and isinstance(loaded, dict):
            self.extras.update({k: v for k, v in loaded.items() if k != "state_dict" and isinstance(v, (int, float, str))})
        if not self._tensors:
            raise CheckpointError(self.path, "holds no tensors")

    @property
    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.extras.items() if isinstance(v, (int, float, str))}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: v.dtype for k, v in self._tensors.items()}

    def tensor(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(self.path, f"no tensor named {name!r}") from None


class ShapeOnlyWeights:
    """Names, shapes and dtypes without data: detect and build models on the meta device from a
    header or a manifest (to check a layout, or to see what a load would allocate)."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        dtypes: Mapping[str, torch.dtype] | None = None,
        path: str | os.PathLike[str] = "<shapes>",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._dtypes = {k: (dtypes or {}).get(k, torch.float32) for k in self._shapes}
        self._metadata = dict(metadata or {})

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, torch.dtype]:
        return dict(self._dtypes)

    def tensor(self, name: str) -> Tensor:
        if name not in self._shapes:
            raise CheckpointError(self.path, f"no tensor named {name!r}")
        return torch.empty(self._shapes[name], dtype=self._dtypes[name], device="meta")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_weights(path: str | os.PathLike[str]) -> WeightFile:
    """Open one weight file by its suffix (not a folder: see :func:`detect` / :func:`load_checkpoint`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a folder; expected a single weight file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchPickleFile(path)
    raise CheckpointError(
        path, f"unknown weight file type {suffix!r}; expected {SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}"
    )


# --------------------------------------------------------------------------- diffusers folders

DIFFUSERS_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")
_DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


class DiffusersFolder:
    """A diffusers-format folder seen as one weight file with keys ``<subfolder>/<key>``.

    Each subfolder's weights are one file or a sharded set (``*.safetensors.index.json``).
    A folder that is itself one model (``config.json`` + weights, e.g. a VAE or ControlNet
    folder) appears under the subfolder name ``.``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.configs: dict[str, dict] = {}
        self._files: dict[str, list[WeightFile]] = {}
        self._owner: dict[str, WeightFile] = {}
        subfolders = [s for s in DIFFUSERS_SUBFOLDERS if (self.path / s).is_dir()]
        if not subfolders and (self.path / "config.json").is_file():
            subfolders = ["."]
        if not subfolders:
            raise CheckpointError(
                self.path, f"is a folder but not in diffusers format (no {', '.join(DIFFUSERS_SUBFOLDERS)} subfolder or config.json)"
            )
        for sub in subfolders:
            folder = self.path / sub
            self.configs[sub] = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
            files = [open_weights(p) for p in _diffusers_weight_files(folder)]
            self._files[sub] = files
            for f in files:
                for key in f.shapes():
                    self._owner[f"{sub}/{key}"] = f
        scheduler = self.path / "scheduler" / "scheduler_config.json"
        self.scheduler_config: dict = _read_json(scheduler) if scheduler.is_file() else {}

    @property
    def subfolders(self) -> list[str]:
        return list(self._files)

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{sub}/{key}": shape for sub, files in self._files.items() for f in files for key, shape in f.shapes().items()
        }

    def dtypes(self) -> dict[str, torch.dtype]:
        return {f"{sub}/{key}": dt for sub, files in self._files.items() for f in files for key, dt in f.dtypes().items()}

    def tensor(self, name: str) -> Tensor:
        owner = self._owner.get(name)
        if owner is None:
            raise CheckpointError(self.path, f"no tensor named {name!r}")
        return owner.tensor(name.split("/", 1)[1])

    def release(self, name: str) -> None:
        owner = self._owner.get(name)
        if isinstance(owner, SafetensorsFile):
            owner.release(name.split("/", 1)[1])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def _diffusers_weight_files(folder: Path) -> list[Path]:
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(index, "has no weight_map object")
            shards = sorted({str(v) for v in weight_map.values()})
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(index, f"names shard files that do not exist: {missing}")
            return [folder / s for s in shards]
    for name in _DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(folder, f"has no weight file (looked for {', '.join(_DIFFUSERS_WEIGHT_NAMES)})")


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class ComponentKeys:
    """Where one component's weights lie in a file: a key prefix and a naming layout.

    layout: ``ldm`` (U-Net/VAE/ControlNet in the original single-file naming), ``diffusers``,
    ``hf`` (transformers CLIP naming, with or without ``text_model.``) or ``openclip``.
    """

    prefix: str
    layout: str


# Entries of full checkpoints that hold no weights our modules use: LDM's noise-schedule buffers,
# EMA copies (the live weights are the ones under model.diffusion_model), SGM's sigma table, and
# marker keys some trainers add. They are reported as ignored, never as unexpected.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "ztsnr",
})
_IGNORED_PREFIXES = ("model_ema.", "denoiser.",
                     *(f"{vae_prefix}{training}" for vae_prefix in ("first_stage_model.", "")
                       for training in vae_module.TRAINING_ONLY_PREFIXES))

V_PRED_MARKER = "v_pred"
# Adapter files: LoRA / LoCon (lora_up/down, PEFT lora_A/B), LoHa (hada_*), LoKr (lokr_*).
_LORA_KEY = re.compile(r"(^|\.|_)(lora_up|lora_down|lora_A|lora_B|hada_w[12]_[ab]|lokr_w[12](_[ab])?)(\.|$)")
_EMBEDDING_KEYS = ({"emb_params"}, {"string_to_param.*"}, {"clip_l", "clip_g"}, {"clip_g"}, {"clip_l"})

_TEXT_ENCODER_PREFIX = re.compile(r"^(cond_stage_model\.(transformer|model)\.|conditioner\.embedders\.(\d+)\.(transformer|model)\.)")

_SDXL_REFINER_ADM_CHANNELS = 2560  # pooled bigG (1280) + 5 x 256 size/aesthetic embeddings


@dataclass(frozen=True)
class Detection:
    """What a weight file (or diffusers folder) holds, from its keys and shapes alone.

    components: component name (``unet``, ``vae``, ``controlnet``, ``clip_l``, ``clip_h``,
    ``clip_g``) -> where its keys are. Text encoders are listed in conditioning order.
    unclaimed_keys: keys no component or ignore rule accounts for.
    """

    path: str
    kind: FileKind
    family: ModelFamily | None = None
    inpainting: bool = False
    components: dict[str, ComponentKeys] = field(default_factory=dict)
    ignored_keys: tuple[str, ...] = ()
    unclaimed_keys: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short phrase for messages: 'an SDXL refiner checkpoint (unet, vae, clip_g)'."""
        family = {
            ModelFamily.SD1: "SD1.x", ModelFamily.SD2: "SD2.x", ModelFamily.SDXL: "SDXL",
            ModelFamily.SDXL_REFINER: "SDXL refiner",
        }.get(self.family, "") if self.family else ""
        what = {
            FileKind.CHECKPOINT: "checkpoint", FileKind.UNET: "U-Net", FileKind.CONTROLNET: "ControlNet",
            FileKind.VAE: "VAE", FileKind.TEXT_ENCODER: "text encoder", FileKind.LORA: "LoRA/adapter",
            FileKind.EMBEDDING: "textual-inversion embedding", FileKind.UNKNOWN: "file of unknown kind",
        }[self.kind]
        words = " ".join(w for w in (family, "inpainting" if self.inpainting else "", what) if w)
        article = "an" if words.startswith("SD") else "a"
        parts = f" ({', '.join(self.components)})" if self.components else ""
        return f"{article} {words}{parts}"


# The model modules' own errors for weights that do not fit their layout.
_LAYOUT_ERRORS = (unet_module.UNetConfigError, vae_module.VAELoadError, text_encoder_module.TextEncoderLoadError)


@contextmanager
def _component_errors(path: str | os.PathLike[str], component: str) -> Iterator[None]:
    """Re-raise a model module's layout error as a StateDictMismatchError naming the file and component."""
    try:
        yield
    except _LAYOUT_ERRORS as exc:
        raise StateDictMismatchError(path, f"{component}: {exc}") from exc


def _meta_state_dict(shapes: Mapping[str, Sequence[int]], prefix: str = "") -> dict[str, Tensor]:
    """Shape-only tensors for keys under `prefix` (prefix removed): mappings run on these without data."""
    return {
        k[len(prefix):]: torch.empty(tuple(s), device="meta")
        for k, s in shapes.items()
        if k.startswith(prefix) and not _is_ignored(k)
    }


def _shapes_of(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _is_ignored(key: str) -> bool:
    return key in _SCHEDULE_BUFFERS or key.startswith(_IGNORED_PREFIXES)


def _has_prefix(keys: Sequence[str] | Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _text_encoder_components(keys: Sequence[str], path: str) -> dict[str, ComponentKeys]:
    """Text encoders of a single-file checkpoint, keyed by slot name, in conditioning order."""
    found: dict[str, ComponentKeys] = {}
    prefixes = sorted({m.group(1) for k in keys if (m := _TEXT_ENCODER_PREFIX.match(k))})
    for prefix in prefixes:
        openclip = prefix.endswith(".model.")
        if prefix.startswith("cond_stage_model."):
            slot = "clip_h" if openclip else "clip_l"
        else:
            slot = "clip_g" if openclip else "clip_l"
        if slot in found:
            raise CheckpointError(path, f"two text encoders claim slot {slot!r} ({found[slot].prefix}, {prefix})")
        found[slot] = ComponentKeys(prefix, "openclip" if openclip else "hf")
    order = {"clip_l": 0, "clip_h": 1, "clip_g": 2}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _unet_ldm_shapes(
    shapes: Mapping[str, Sequence[int]], keys: ComponentKeys, path: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    meta = _meta_state_dict(shapes, keys.prefix)
    if keys.layout == "diffusers":
        with _component_errors(path, "unet"):
            meta = unet_module.ldm_unet_keys_from_diffusers(meta)
    return _shapes_of(meta)


def _controlnet_ldm_shapes(
    shapes: Mapping[str, Sequence[int]], keys: ComponentKeys, path: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    meta = _meta_state_dict(shapes, keys.prefix)
    if keys.layout == "diffusers":
        with _component_errors(path, "controlnet"):
            meta = controlnet_module.ldm_controlnet_keys_from_diffusers(meta)
    return _shapes_of(meta)


def _has_linear_proj_in(ldm_shapes: Mapping[str, Sequence[int]]) -> bool:
    proj_in = [s for k, s in ldm_shapes.items() if k.endswith(".proj_in.weight")]
    return bool(proj_in) and len(proj_in[0]) == 2


def _family_from_unet(
    ldm_shapes: Mapping[str, Sequence[int]], text_encoders: Sequence[str], path: str
) -> tuple[ModelFamily, bool]:
    """Family and inpainting flag of an LDM-layout U-Net (or ControlNet) from its layout."""
    if "input_blocks.0.0.weight" not in ldm_shapes:
        raise CheckpointError(path, "U-Net has no input_blocks.0.0.weight; not an SD U-Net layout")
    in_channels = ldm_shapes["input_blocks.0.0.weight"][1]
    out_conv = ldm_shapes.get("out.2.weight")
    inpainting = out_conv is not None and in_channels == 2 * out_conv[0] + 1
    if "label_emb.0.0.weight" in ldm_shapes:
        if text_encoders:
            refiner = list(text_encoders) == ["clip_g"]
        else:
            refiner = ldm_shapes["label_emb.0.0.weight"][1] == _SDXL_REFINER_ADM_CHANNELS
        return (ModelFamily.SDXL_REFINER if refiner else ModelFamily.SDXL), inpainting
    if "clip_h" in text_encoders:
        return ModelFamily.SD2, inpainting
    if "clip_l" in text_encoders:
        return ModelFamily.SD1, inpainting
    return (ModelFamily.SD2 if _has_linear_proj_in(ldm_shapes) else ModelFamily.SD1), inpainting


def _claim(keys: Sequence[str], components: Mapping[str, ComponentKeys]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ignored, unclaimed = [], []
    for key in keys:
        if _is_ignored(key):
            ignored.append(key)
        elif not any(key.startswith(c.prefix) for c in components.values()):
            unclaimed.append(key)
    return tuple(ignored), tuple(unclaimed)


def _is_lora(keys: Sequence[str]) -> bool:
    return any(_LORA_KEY.search(k) for k in keys)


def _is_embedding(keys: Sequence[str]) -> bool:
    names = {("string_to_param.*" if k.startswith("string_to_param.") else k) for k in keys}
    return any(names == pattern for pattern in _EMBEDDING_KEYS)


def _standalone_component(keys: Sequence[str], path: str) -> tuple[FileKind, dict[str, ComponentKeys]] | None:
    """A file holding one bare component (no checkpoint prefix), or one with just its own prefix."""
    key_set = set(keys)
    for prefix in ("control_model.", ""):
        if f"{prefix}input_hint_block.0.weight" in key_set:
            return FileKind.CONTROLNET, {"controlnet": ComponentKeys(prefix, "ldm")}
    if "controlnet_cond_embedding.conv_in.weight" in key_set:
        return FileKind.CONTROLNET, {"controlnet": ComponentKeys("", "diffusers")}
    if "input_blocks.0.0.weight" in key_set and "time_embed.0.weight" in key_set:
        return FileKind.UNET, {"unet": ComponentKeys("", "ldm")}
    if "conv_in.weight" in key_set and "time_embedding.linear_1.weight" in key_set:
        return FileKind.UNET, {"unet": ComponentKeys("", "diffusers")}
    for prefix in ("first_stage_model.", "vae.", ""):
        if f"{prefix}encoder.conv_in.weight" in key_set and f"{prefix}decoder.conv_in.weight" in key_set:
            bare = [k[len(prefix):] for k in keys if k.startswith(prefix)]
            layout = "diffusers" if vae_module.is_diffusers_vae_layout(bare) else "ldm"
            return FileKind.VAE, {"vae": ComponentKeys(prefix, layout)}
    text_encoders = _text_encoder_components(keys, path)
    if text_encoders:
        return FileKind.TEXT_ENCODER, text_encoders
    for prefix in ("", "text_model."):
        if f"{prefix}embeddings.token_embedding.weight" in key_set:
            return FileKind.TEXT_ENCODER, {"text_encoder": ComponentKeys("", "hf")}
    if "token_embedding.weight" in key_set and "positional_embedding" in key_set:
        return FileKind.TEXT_ENCODER, {"text_encoder": ComponentKeys("", "openclip")}
    return None


def detect_from_shapes(
    shapes: Mapping[str, Sequence[int]], path: str | os.PathLike[str] = "<shapes>"
) -> Detection:
    """Classify a single file's keys (full names, as stored) with their shapes."""
    path = str(path)
    keys = list(shapes)
    if _has_prefix(keys, "model.diffusion_model."):
        components: dict[str, ComponentKeys] = {"unet": ComponentKeys("model.diffusion_model.", "ldm")}
        if _has_prefix(keys, "first_stage_model."):
            bare = [k[len("first_stage_model."):] for k in keys if k.startswith("first_stage_model.")]
            layout = "diffusers" if vae_module.is_diffusers_vae_layout(bare) else "ldm"
            components["vae"] = ComponentKeys("first_stage_model.", layout)
        text_encoders = _text_encoder_components(keys, path)
        components.update(text_encoders)
        family, inpainting = _family_from_unet(_unet_ldm_shapes(shapes, components["unet"], path), list(text_encoders), path)
        ignored, unclaimed = _claim(keys, components)
        return Detection(path, FileKind.CHECKPOINT, family, inpainting, components, ignored, unclaimed)
    if _is_lora(keys):
        return Detection(path, FileKind.LORA)
    if _is_embedding(keys):
        return Detection(path, FileKind.EMBEDDING)
    standalone = _standalone_component(keys, path)
    if standalone is None:
        return Detection(path, FileKind.UNKNOWN, unclaimed_keys=tuple(keys))
    kind, components = standalone
    family: ModelFamily | None = None
    inpainting = False
    if kind is FileKind.UNET:
        family, inpainting = _family_from_unet(_unet_ldm_shapes(shapes, components["unet"], path), [], path)
    elif kind is FileKind.CONTROLNET:
        family, _ = _family_from_unet(_controlnet_ldm_shapes(shapes, components["controlnet"], path), [], path)
    ignored, unclaimed = _claim(keys, components)
    return Detection(path, kind, family, inpainting, components, ignored, unclaimed)


def _detect_folder(folder: DiffusersFolder) -> Detection:
    shapes = folder.shapes()
    path = str(folder.path)
    subs = folder.subfolders
    if subs == ["."]:
        inner = detect_from_shapes({k[2:]: s for k, s in shapes.items()}, path)
        components = {n: ComponentKeys("./" + c.prefix, c.layout) for n, c in inner.components.items()}
        return replace(inner, components=components)
    components: dict[str, ComponentKeys] = {}
    if "unet" in subs:
        components["unet"] = ComponentKeys("unet/", "diffusers")
    if "controlnet" in subs and "unet" not in subs:
        components["controlnet"] = ComponentKeys("controlnet/", "diffusers")
    if "vae" in subs:
        components["vae"] = ComponentKeys("vae/", "diffusers")
    unet_ldm = _unet_ldm_shapes(shapes, components["unet"], path) if "unet" in components else {}
    sdxl_type = "label_emb.0.0.weight" in unet_ldm
    # diffusers names encoders by position; which CLIP each is follows from the pipeline type.
    if "text_encoder" in subs:
        slot = "clip_l" if sdxl_type or not _has_linear_proj_in(unet_ldm) else "clip_h"
        components[slot] = ComponentKeys("text_encoder/", "hf")
    if "text_encoder_2" in subs:
        components["clip_g"] = ComponentKeys("text_encoder_2/", "hf")
    if "unet" in components:
        text_encoders = [n for n in components if n.startswith("clip_")]
        family, inpainting = _family_from_unet(unet_ldm, text_encoders, path)
        kind = FileKind.CHECKPOINT
    elif "controlnet" in components:
        family, _ = _family_from_unet(_controlnet_ldm_shapes(shapes, components["controlnet"], path), [], path)
        inpainting, kind = False, FileKind.CONTROLNET
    else:
        raise CheckpointError(path, f"diffusers folder has no unet/ or controlnet/ (found: {', '.join(subs)})")
    ignored, unclaimed = _claim(list(shapes), components)
    return Detection(path, kind, family, inpainting, components, ignored, unclaimed)


def _open(path: str | os.PathLike[str] | WeightFile) -> tuple[WeightFile, Detection]:
    if not isinstance(path, (str, os.PathLike)):
        return path, detect_from_shapes(path.shapes(), path.path)
    path = Path(path)
    if path.is_dir():
        folder = DiffusersFolder(path)
        return folder, _detect_folder(folder)
    source = open_weights(path)
    return source, detect_from_shapes(source.shapes(), path)


def detect(path: str | os.PathLike[str]) -> Detection:
    """What the file or diffusers folder at `path` holds (reads safetensors headers only)."""
    return _open(path)[1]


# --------------------------------------------------------------------------- prediction type


_YAML_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*[\"']?([A-Za-z_]+)[\"']?\s*(#.*)?$", re.MULTILINE)
_SD2_BASE_GLOBAL_STEP = 875000


def sidecar_config_path(path: Path) -> Path:
    """Where an LDM config for a single-file checkpoint is looked for: same name, ``.yaml``."""
    return path.with_suffix(".yaml")


def _prediction_from_name(value: str, where: str) -> Prediction:
    value = value.strip().lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return Prediction.V
    if value in ("eps", "epsilon"):
        return Prediction.EPS
    raise CheckpointError(where, f"unknown prediction type {value!r}; expected 'eps'/'epsilon' or 'v'/'v_prediction'")


def resolve_prediction(
    detection: Detection, source: WeightFile, override: Prediction | str | None = None
) -> tuple[Prediction, str]:
    """The prediction type and which rule gave it (see the module docstring for the order)."""
    if override is not None:
        return (override if isinstance(override, Prediction) else _prediction_from_name(override, "prediction argument")), "argument"
    if V_PRED_MARKER in detection.ignored_keys:
        return Prediction.V, f"marker key {V_PRED_MARKER!r}"
    spec = source.metadata.get("modelspec.prediction_type")
    if spec:
        return _prediction_from_name(spec, f"{detection.path} metadata"), "metadata modelspec.prediction_type"
    path = Path(detection.path)
    if path.is_file():
        sidecar = sidecar_config_path(path)
        if sidecar.is_file():
            match = _YAML_PARAMETERIZATION.search(sidecar.read_text(encoding="utf-8", errors="replace"))
            prediction = _prediction_from_name(match.group(1), str(sidecar)) if match else Prediction.EPS
            return prediction, f"sidecar {sidecar.name}"
    if isinstance(source, DiffusersFolder) and "prediction_type" in source.scheduler_config:
        return (
            _prediction_from_name(str(source.scheduler_config["prediction_type"]), f"{path}/scheduler"),
            "scheduler/scheduler_config.json",
        )
    if isinstance(source, TorchPickleFile) and detection.family is ModelFamily.SD2:
        if source.extras.get("global_step") == _SD2_BASE_GLOBAL_STEP:
            return Prediction.EPS, f"global_step {_SD2_BASE_GLOBAL_STEP} (SD2-base release)"
    if detection.family is ModelFamily.SD2 and not detection.inpainting:
        return Prediction.V, "SD2 default (768-v layout)"
    return Prediction.EPS, "family default"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LatentFormat:
    """The latent space the diffusion model works in.

    channels: latent channels; downscale_factor: image pixels per latent cell along a side;
    diffusion latents = (vae latents - shift_factor) * scaling_factor.
    """

    channels: int
    scaling_factor: float
    shift_factor: float
    downscale_factor: int


# Every SD1/SD2/SDXL VAE is f8; used only when a checkpoint carries no VAE to measure.
_FAMILY_DOWNSCALE = 8


@dataclass
class LoadedCheckpoint:
    """A loaded diffusion checkpoint.

    text_encoders: slot name (``clip_l``, ``clip_h``, ``clip_g``) -> encoder, in conditioning order.
    hidden_state: which text-encoder layer conditions the U-Net (see :mod:`text_encoder`); differs
    from the family's usual choice for diffusers SD2 folders, whose encoder had its last layer cut.
    unexpected_keys: keys nothing used (only non-empty when loaded with ``strict=False``).
    ignored_keys: known non-weight entries (schedule buffers, EMA copies, markers).
    """

    path: str
    detection: Detection
    family: ModelFamily
    prediction: Prediction
    prediction_source: str
    unet: unet_module.UNet
    unet_config: unet_module.UNetConfig
    vae: vae_module.AutoencoderKL | None
    vae_config: vae_module.VAEConfig | None
    text_encoders: dict[str, text_encoder_module.CLIPTextEncoder]
    text_encoder_configs: dict[str, text_encoder_module.TextEncoderConfig]
    latent_format: LatentFormat
    hidden_state: text_encoder_module.HiddenStateChoice
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def inpainting(self) -> bool:
        return self.detection.inpainting


@dataclass
class LoadedVAE:
    """A standalone VAE. latent_format is None when neither the file nor the caller says the family
    (the scaling factor then must come from the diffusion model it is paired with)."""

    path: str
    vae: vae_module.AutoencoderKL
    config: vae_module.VAEConfig
    family: ModelFamily | None
    latent_format: LatentFormat | None
    unexpected_keys: list[str] = field(default_factory=list)


@dataclass
class LoadedControlNet:
    path: str
    controlnet: controlnet_module.ControlNet
    config: controlnet_module.ControlNetConfig
    family: ModelFamily
    unexpected_keys: list[str] = field(default_factory=list)


class _Materializer:
    """Reads a component's tensors from the source, in the target device/dtype, freeing mapped pages it copied."""

    def __init__(self, source: WeightFile, device: torch.device, dtype: torch.dtype) -> None:
        self.source = source
        self.device = device
        self.dtype = dtype

    def tensor(self, name: str) -> Tensor:
        original = self.source.tensor(name)
        dtype = self.dtype if original.is_floating_point() else original.dtype
        converted = original.to(device=self.device, dtype=dtype)
        if converted is not original:
            release = getattr(self.source, "release", None)
            if release is not None:
                del original
                release(name)
        return converted

    def state_dict(self, keys: ComponentKeys) -> dict[str, Tensor]:
        names = [k for k in self.source.shapes() if k.startswith(keys.prefix) and not _is_ignored(k)]
        return {k[len(keys.prefix):]: self.tensor(k) for k in names}


def _instantiate(
    build: Callable[[], nn.Module],
    state_dict: Mapping[str, Tensor],
    component: str,
    path: str,
    strict: bool,
) -> tuple[nn.Module, list[str]]:
    """Build on the meta device and take the tensors as parameters (no init, no copy).

    Missing keys are always an error (the module would be left without weights); unexpected
    keys are an error when `strict`, else returned.
    """
    with torch.device("meta"):
        module = build()
    try:
        result = module.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())  # torch lists mismatches on tab-indented lines
        raise StateDictMismatchError(
            path, f"{component} weights do not fit the architecture derived from their shapes: {detail}"
        ) from exc
    if result.missing_keys:
        raise StateDictMismatchError(
            path, f"{component} is missing {len(result.missing_keys)} key(s): {_key_list(result.missing_keys)}"
        )
    if result.unexpected_keys and strict:
        raise StateDictMismatchError(
            path, f"{component} has {len(result.unexpected_keys)} unexpected key(s): {_key_list(result.unexpected_keys)} "
            "(pass strict=False to load anyway)",
        )
    shape_only = all(t.is_meta for t in state_dict.values())
    left_on_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left_on_meta and not shape_only:
        raise StateDictMismatchError(path, f"{component} has tensors no key provides: {_key_list(left_on_meta)}")
    return module.eval(), [f"{component}:{k}" for k in result.unexpected_keys]


def _key_list(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _target(device: str | torch.device, dtype: str | torch.dtype | None, component: Component) -> tuple[torch.device, torch.dtype]:
    if device != "auto" and torch.device(device).type == "meta":
        # Shapes only: modules are built but hold no data.
        return torch.device("meta"), resolve_dtype(dtype, torch.device("cpu"), component)
    resolved = pick_device(device)
    return resolved, resolve_dtype(dtype, resolved, component)


def _text_encoder_shapes(shapes: Mapping[str, Sequence[int]], keys: ComponentKeys) -> dict[str, tuple[int, ...]]:
    return _shapes_of(_meta_state_dict(shapes, keys.prefix))


def _load_unet(
    source: WeightFile, detection: Detection, keys: ComponentKeys, device: str | torch.device,
    dtype: str | torch.dtype | None, strict: bool,
) -> tuple[nn.Module, object, list[str]]:
    with _component_errors(detection.path, "unet"):
        config = unet_module.unet_config_from_shapes(_unet_ldm_shapes(source.shapes(), keys, detection.path))
    target_device, target_dtype = _target(device, dtype, "unet")
    state_dict = _Materializer(source, target_device, target_dtype).state_dict(keys)
    if keys.layout == "diffusers":
        with _component_errors(detection.path, "unet"):
            state_dict = unet_module.ldm_unet_keys_from_diffusers(state_dict)
    module, unexpected = _instantiate(lambda: unet_module.UNet(config), state_dict, "unet", detection.path, strict)
    return module, config, unexpected


def _load_vae_component(
    source: WeightFile, detection: Detection, keys: ComponentKeys, family: ModelFamily | None,
    device: str | torch.device, dtype: str | torch.dtype | None, strict: bool, scaling_override: float | None = None,
) -> tuple[vae_module.AutoencoderKL, vae_module.VAEConfig, list[str]]:
    meta = _meta_state_dict(source.shapes(), keys.prefix)
    with _component_errors(detection.path, "vae"):
        if keys.layout == "diffusers":
            meta = vae_module.ldm_vae_keys_from_diffusers(meta)
        config = vae_module.vae_config_from_shapes(_shapes_of(meta), family=(family or ModelFamily.SD1).latent_family)
    if scaling_override is not None:
        config = replace(config, scaling_factor=scaling_override)
    target_device, target_dtype = _target(device, dtype, "vae")
    state_dict = _Materializer(source, target_device, target_dtype).state_dict(keys)
    if keys.layout == "diffusers":
        with _component_errors(detection.path, "vae"):
            state_dict = vae_module.ldm_vae_keys_from_diffusers(state_dict)
    module, unexpected = _instantiate(lambda: vae_module.AutoencoderKL(config), state_dict, "vae", detection.path, strict)
    return module, config, unexpected  # type: ignore[return-value]


def _load_text_encoder(
    source: WeightFile, detection: Detection, slot: str, keys: ComponentKeys, device: str | torch.device,
    dtype: str | torch.dtype | None, strict: bool, activation: str | None,
) -> tuple[text_encoder_module.CLIPTextEncoder, text_encoder_module.TextEncoderConfig, list[str]]:
    with _component_errors(detection.path, slot):
        config = text_encoder_module.text_encoder_config_from_shapes(
            _text_encoder_shapes(source.shapes(), keys), activation=activation  # type: ignore[arg-type]
        )
    target_device, target_dtype = _target(device, dtype, "text_encoder")
    state_dict = _Materializer(source, target_device, target_dtype).state_dict(keys)
    with _component_errors(detection.path, slot):
        state_dict = text_encoder_module.text_encoder_state_dict(state_dict)
    module, unexpected = _instantiate(
        lambda: text_encoder_module.CLIPTextEncoder(config), state_dict, slot, detection.path, strict
    )
    return module, config, unexpected  # type: ignore[return-value]


def _folder_activation(source: WeightFile, keys: ComponentKeys) -> str | None:
    """A diffusers text encoder's activation from its config.json (HF layout does not imply CLIP-L there)."""
    if not isinstance(source, DiffusersFolder):
        return None
    act = source.configs.get(keys.prefix.rstrip("/"), {}).get("hidden_act")
    if act is None:
        return None
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(source.path, f"text encoder activation {act!r} is not supported (quick_gelu or gelu)")
    return act


def _expect(detection: Detection, expected: FileKind, what: str) -> None:
    if detection.kind is not expected:
        hint = ""
        if detection.kind is FileKind.CHECKPOINT and expected is FileKind.VAE and "vae" in detection.components:
            hint = " (its VAE loads with load_checkpoint)"
        raise WrongModelKindError(detection.path, f"expected {what}, but this is {detection.describe()}{hint}")


def _reject_unclaimed(detection: Detection, strict: bool) -> list[str]:
    if detection.unclaimed_keys and strict:
        raise StateDictMismatchError(
            detection.path,
            f"{len(detection.unclaimed_keys)} key(s) belong to no component: {_key_list(list(detection.unclaimed_keys))} "
            "(pass strict=False to load anyway)",
        )
    return list(detection.unclaimed_keys)


def load_checkpoint(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    prediction: Prediction | str | None = None,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load a diffusion checkpoint (single file or diffusers folder): U-Net, VAE, text encoders.

    device: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda:0"``, ...; dtype: ``None``/``"auto"``
    for the per-component policy of :func:`devices.default_dtype`, or one dtype for all.
    prediction: overrides the detected prediction type (``"eps"`` or ``"v"``).
    strict: keys nothing uses are an error (default); with ``False`` they are listed in
    ``unexpected_keys``. Missing weights are always an error.
    """
    source, detection = _open(path)
    if detection.kind not in (FileKind.CHECKPOINT, FileKind.UNET):
        raise WrongModelKindError(detection.path, f"expected a diffusion checkpoint, but this is {detection.describe()}")
    assert detection.family is not None
    unexpected = _reject_unclaimed(detection, strict)
    family = detection.family
    unet, unet_config, extra = _load_unet(source, detection, detection.components["unet"], device, dtype, strict)
    unexpected += extra

    vae = vae_config = None
    if "vae" in detection.components:
        scaling = None
        if isinstance(source, DiffusersFolder) and "scaling_factor" in source.configs.get("vae", {}):
            scaling = float(source.configs["vae"]["scaling_factor"])
        vae, vae_config, extra = _load_vae_component(
            source, detection, detection.components["vae"], family, device, dtype, strict, scaling
        )
        unexpected += extra
    else:
        logger.warning("%s: no VAE in this checkpoint; load one with load_vae", detection.path)

    text_encoders, text_encoder_configs = {}, {}
    for slot, keys in detection.components.items():
        if not slot.startswith("clip_"):
            continue
        encoder, config, extra = _load_text_encoder(
            source, detection, slot, keys, device, dtype, strict, _folder_activation(source, keys)
        )
        text_encoders[slot], text_encoder_configs[slot] = encoder, config
        unexpected += extra

    hidden_state = text_encoder_module.HIDDEN_STATE_BY_FAMILY[family.latent_family]
    if isinstance(source, DiffusersFolder) and family is ModelFamily.SD2:
        # diffusers exports SD2's OpenCLIP tower without its last layer, so its last layer is SD2's penultimate.
        hidden_state = replace(hidden_state, clip_skip=1)

    scaling = vae_module.latent_scaling_for(family.latent_family)
    if vae_config is not None:
        latent_format = LatentFormat(
            vae_config.latent_channels, vae_config.scaling_factor, vae_config.shift_factor, vae_config.downscale_factor
        )
    else:
        out_channels = unet_config.out_channels
        latent_format = LatentFormat(out_channels, scaling.scaling_factor, scaling.shift_factor, _FAMILY_DOWNSCALE)

    predicted, prediction_source = resolve_prediction(detection, source, prediction)
    logger.info(
        "%s: %s, %s prediction (%s)", detection.path, detection.describe(), predicted.value, prediction_source
    )
    return LoadedCheckpoint(
        path=detection.path,
        detection=detection,
        family=family,
        prediction=predicted,
        prediction_source=prediction_source,
        unet=unet,
        unet_config=unet_config,
        vae=vae,
        vae_config=vae_config,
        text_encoders=text_encoders,
        text_encoder_configs=text_encoder_configs,
        latent_format=latent_format,
        hidden_state=hidden_state,
        unexpected_keys=unexpected,
        ignored_keys=list(detection.ignored_keys),
    )


def load_vae(
    path: str | os.PathLike[str] | WeightFile,
    family: ModelFamily | str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> LoadedVAE:
    """Load a standalone VAE file (LDM or diffusers layout) or diffusers VAE folder.

    The weights do not say which latent space the VAE serves (SD1 and SDXL VAEs have the same
    shapes): give `family` for the scaling factor, or use the checkpoint's latent format.
    A diffusers folder's ``config.json`` ``scaling_factor`` is used when present.
    """
    source, detection = _open(path)
    _expect(detection, FileKind.VAE, "a VAE")
    unexpected = _reject_unclaimed(detection, strict)
    resolved_family = ModelFamily(family) if family is not None else None
    scaling = None
    if isinstance(source, DiffusersFolder) and "scaling_factor" in source.configs.get(".", {}):
        scaling = float(source.configs["."]["scaling_factor"])
    vae, config, extra = _load_vae_component(
        source, detection, detection.components["vae"], resolved_family, device, dtype, strict, scaling
    )
    known = resolved_family is not None or scaling is not None
    latent_format = (
        LatentFormat(config.latent_channels, config.scaling_factor, config.shift_factor, config.downscale_factor)
        if known else None
    )
    return LoadedVAE(detection.path, vae, config, resolved_family, latent_format, unexpected + extra)


def load_controlnet(
    path: str | os.PathLike[str] | WeightFile,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    strict: bool = True,
) -> LoadedControlNet:
    """Load a ControlNet: original layout (``control_model.*`` or bare keys) or diffusers layout/folder."""
    source, detection = _open(path)
    _expect(detection, FileKind.CONTROLNET, "a ControlNet")
    assert detection.family is not None
    unexpected = _reject_unclaimed(detection, strict)
    keys = detection.components["controlnet"]
    with _component_errors(detection.path, "controlnet"):
        config = controlnet_module.controlnet_config_from_shapes(_controlnet_ldm_shapes(source.shapes(), keys, detection.path))
    target_device, target_dtype = _target(device, dtype, "controlnet")
    state_dict = _Materializer(source, target_device, target_dtype).state_dict(keys)
    if keys.layout == "diffusers":
        with _component_errors(detection.path, "controlnet"):
            state_dict = controlnet_module.ldm_controlnet_keys_from_diffusers(state_dict)
    module, extra = _instantiate(
        lambda: controlnet_module.ControlNet(config), state_dict, "controlnet", detection.path, strict
    )
    return LoadedControlNet(detection.path, module, config, detection.family, unexpected + extra)
