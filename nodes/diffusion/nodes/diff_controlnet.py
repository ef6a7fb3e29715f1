"""Loader of difference ControlNets: ControlNet weights stored as differences to the model they are used with."""

from __future__ import annotations

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import CONTROL_NET, MODEL

from ..architectures.diff_controlnet import load_difference_controlnet
from ..components import DiffusionModel
from ..networks.unet import UNet
from ..weights.safetensors_io import CheckpointError
from .common import InputError, run_device
from .loading import ModelFileNode, model_file


class LoadDiffControlNet(ModelFileNode):
    """Load a difference ControlNet (the diff_control_sd15_* files) for a model: its weights are the
    differences to the model's, added to them here (with the model's LoRAs), so the ControlNet fits
    a fine-tuned model. An ordinary ControlNet file loads as LoadControlNet loads it."""

    category = "loaders"
    model_kind = "controlnet"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        name: model_file("controlnet")  # type: ignore[valid-type]

    class Outputs(NodeOutputs):
        control_net: CONTROL_NET.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        if not isinstance(model.network, UNet):
            raise InputError("model", f"difference ControlNets are made for SD U-Nets; this is a {model.family.label} "
                                      "model")
        path = self.model_path(inputs.name)
        try:
            with model.patched_network() as network:
                loaded = load_difference_controlnet(path, network, device=run_device(ctx))
        except CheckpointError as error:  # StateDictMismatchError among them
            raise InputError("name", str(error)) from None
        return self.Outputs(control_net=loaded)


NODES: list[type[Node]] = [LoadDiffControlNet]
