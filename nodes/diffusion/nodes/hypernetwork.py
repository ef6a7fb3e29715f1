"""Loader of hypernetworks: small MLPs on the U-Net's attention inputs (networks.hypernetwork), applied while the model runs."""

from __future__ import annotations

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import MODEL

from ..components import DiffusionModel
from ..networks.hypernetwork import Hypernetwork, HypernetworkError, HypernetworkHook
from ..networks.unet import UNet
from .common import InputError
from .loading import ModelFileNode, model_file


class LoadHypernetwork(ModelFileNode):
    """Apply a hypernetwork (A1111 / ComfyUI .pt format, from the hypernetworks folder) to an SD
    U-Net: each attention layer computes its keys and values from its inputs plus strength times
    the hypernetwork's MLP of them. The model's weights are not changed; chain several to stack them."""

    category = "loaders"
    model_kind = "hypernetworks"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        name: model_file("hypernetworks")  # type: ignore[valid-type]
        strength: float = Field(1.0, ge=-10.0, le=10.0, description="How strongly the hypernetwork acts.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        if not isinstance(model.network, UNet):
            raise InputError("model", f"hypernetworks act on SD U-Nets; this is a {model.family.label} model")
        try:
            hypernetwork = Hypernetwork.load(self.model_path(inputs.name))
        except HypernetworkError as error:
            raise InputError("name", str(error)) from None
        context_dim = model.network.config.context_dim
        widths = sorted(hypernetwork.mlps)
        ctx.log.info("%s: MLPs for attention inputs of width %s (this model's text: %d)", inputs.name,
                     ", ".join(map(str, widths)), context_dim)
        return self.Outputs(model=model.with_hook(HypernetworkHook(hypernetwork, inputs.strength)))


NODES: list[type[Node]] = [LoadHypernetwork]
