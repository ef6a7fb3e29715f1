"""Build a model from a weight file: tensors read in the target device and dtype, modules built on the meta device and given them (no random init, no extra copy)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from .devices import COPY_WORK_PER_ELEMENT, Component, cpu_threads, pick_device, resolve_dtype
from .files import WeightFile
from .safetensors_io import CheckpointError
from .storage import is_scale_key


class WrongModelKindError(CheckpointError):
    """The file holds a different kind of model than the one asked for."""


class StateDictMismatchError(CheckpointError):
    """A component's weights do not fit the architecture derived for it (names the keys)."""



class Materializer:
    """Reads a component's tensors from the source, in the target device/dtype, freeing mapped pages it copied.

    keep_dtypes: file dtypes that stay as they are (moved to the device, not converted), e.g.
    :data:`.storage.FLOAT8_DTYPES` so an fp8 file takes its own size in memory; the module built
    from them then runs through :func:`.storage.compute_in`. The per-layer entries of scaled-fp8
    files (:func:`.storage.is_scale_key`) are kept as stored too whenever ``keep_dtypes`` is given:
    rounding a float32 scale to the target dtype would change every weight it multiplies.
    """

    def __init__(
        self,
        source: WeightFile,
        device: torch.device,
        dtype: torch.dtype,
        keep_dtypes: Collection[torch.dtype] = (),
    ) -> None:
        self.source = source
        self.device = device
        self.dtype = dtype
        self.keep_dtypes = frozenset(keep_dtypes)

    def tensor(self, name: str) -> Tensor:
        original = self.source.tensor(name)
        dtype = self.dtype if original.is_floating_point() else original.dtype
        if original.dtype in self.keep_dtypes or (self.keep_dtypes and is_scale_key(name)):
            dtype = original.dtype
        converted = original.to(device=self.device, dtype=dtype)
        if converted is not original:
            release = getattr(self.source, "release", None)
            if release is not None:
                del original
                release(name)
        return converted

    def state_dict(self, prefix: str, skip: Callable[[str], bool]) -> dict[str, Tensor]:
        """Every tensor under `prefix` (prefix removed) except those `skip` says hold no weights."""
        shapes = self.source.shapes()
        names = [k for k in shapes if k.startswith(prefix) and not skip(k)]
        elements = sum(math.prod(shapes[k]) for k in names)
        with cpu_threads(self.device, elements * COPY_WORK_PER_ELEMENT):
            return {k[len(prefix):]: self.tensor(k) for k in names}


def instantiate(
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
            path, f"{component} is missing {len(result.missing_keys)} key(s): {key_list(result.missing_keys)}"
        )
    if result.unexpected_keys and strict:
        raise StateDictMismatchError(
            path, f"{component} has {len(result.unexpected_keys)} unexpected key(s): {key_list(result.unexpected_keys)} "
            "(pass strict=False to load anyway)",
        )
    shape_only = all(t.is_meta for t in state_dict.values())
    left_on_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left_on_meta and not shape_only:
        raise StateDictMismatchError(path, f"{component} has tensors no key provides: {key_list(left_on_meta)}")
    return module.eval(), [f"{component}:{k}" for k in result.unexpected_keys]


def key_list(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def target_device_dtype(device: str | torch.device, dtype: str | torch.dtype | None, component: Component) -> tuple[torch.device, torch.dtype]:
    if device != "auto" and torch.device(device).type == "meta":
        # Shapes only: modules are built but hold no data.
        return torch.device("meta"), resolve_dtype(dtype, torch.device("cpu"), component)
    resolved = pick_device(device)
    return resolved, resolve_dtype(dtype, resolved, component)
