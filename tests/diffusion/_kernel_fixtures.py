"""networks/kernels' oneDNN paths at any size, so that tiny test networks take the paths full-size models take.

The size thresholds in kernels.py keep a tiny network's products on torch's kernels; parity tests
against diffusers would then never see the oneDNN results. The fixture sets every threshold to 0
(and attention's thread limit to the current count) and records each oneDNN product call.
"""

from __future__ import annotations

import pytest
import torch

from nodegraph_diffusion.networks import kernels

_THRESHOLDS = ("LINEAR_MIN_ROWS", "LINEAR_MIN_MACS", "POINTWISE_MIN_MACS", "ATTENTION_MIN_WORK", "GELU_LINEAR_MIN_MACS")


@pytest.fixture
def onednn_at_any_size(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The oneDNN paths for products of any size; returns the list of the arguments of every
    ``torch.ops.mkldnn._linear_pointwise`` call made while the test runs (x, weight, bias, ...: a
    call without bias is one of attention's two products per block of queries)."""
    if not kernels._ONEDNN_AVAILABLE:
        pytest.skip("this torch build has no oneDNN ops")
    for name in _THRESHOLDS:
        monkeypatch.setattr(kernels, name, 0)
    monkeypatch.setattr(kernels, "ATTENTION_MAX_THREADS", torch.get_num_threads())
    calls: list[tuple] = []
    product = torch.ops.mkldnn._linear_pointwise

    class Recording:
        """The overload packet's default call, recorded; ``.binary`` (GEGLU's fused product) too."""

        def __call__(self, *args: object) -> torch.Tensor:
            calls.append(args)
            return product(*args)

        def binary(self, *args: object) -> torch.Tensor:
            calls.append(args)
            return product.binary(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Recording())
    return calls
