"""How much memory the device a workflow runs on holds: the bound that nodes' memory estimates
are checked against at validation (see Node.estimated_bytes)."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the platform does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def device_memory_bytes(device: str) -> int | None:
    """The total memory of `device` ("cpu", "cuda", "cuda:1", "mps", "auto"), or None if unknown.

    The engine does not import torch: a CUDA device is asked about only when a pack already
    imported torch (a pack that computes on the GPU does). "auto" means CUDA when there is one,
    else this machine's RAM (MPS shares it), as the nodes resolve it.
    """
    kind, _, index = device.partition(":")
    if kind in ("cuda", "auto"):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            number = int(index) if index.isdigit() else torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(number).total_memory)
        if kind == "cuda":
            log.warning("device %s: CUDA is not available here; memory estimates are not checked", device)
            return None
    return physical_memory_bytes()
