"""Loader of difference ControlNets: ControlNet weights stored as differences to the model they are used with."""

from __future__ import annotations

from typing import Any

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CONTROL_NET, MODEL

from ..architectures.diff_controlnet import load_difference_controlnet
from ..components import DiffusionModel
from ..networks.unet import UNet
from ..weights.safetensors_io import CheckpointError
from .common import InputError, run_device
from .loading import _file_fingerprint, _model_file, _resolve


class LoadDiffControlNet(Node):
    """Load a difference ControlNet (the diff_control_sd15_* files) for a model: its weights are the
    differences to the model's, added to them here (with the model's LoRAs), so the ControlNet fits
    a fine-tuned model. An ordinary ControlNet file loads as LoadControlNet loads it."""

    category = "loaders"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        name: _model_file("controlnet")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        control_net: CONTROL_NET.annotation

    @classmethod
    def fingerprint(cls, literals: dict[str, Any]) -> str | None:
        return _file_fingerprint("controlnet", literals.get("name"))

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        if not isinstance(model.network, UNet):
            raise InputError("model", f"difference ControlNets are made for SD U-Nets; this is a {model.family.label} "
                                      "model")
        path = _resolve("controlnet", inputs.name)
        try:
            with model.patched_network() as network:
                loaded = load_difference_controlnet(path, network, device=run_device(ctx))
        except CheckpointError as error:  # StateDictMismatchError among them
            raise InputError("name", str(error)) from None
        return self.Outputs(control_net=loaded)


NODES: list[type[Node]] = [LoadDiffControlNet]
