"""Continuous-time model sampling: drive a model on EDM-style continuous noise levels (CosXL and other EDM-trained models)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from nodegraph.node import Node, NodeInputs, NodeOutputs, RunContext
from nodegraph.types import MODEL

from ..components import DiffusionModel
from ..sampling.model_sampling import ModelSampling, ModelSamplingError, Prediction
from .common import InputError

# ComfyUI's names for the predictions ModelSamplingContinuousEDM sets, with their sigma_data.
CONTINUOUS_PREDICTIONS: dict[str, tuple[Prediction, float]] = {
    "v_prediction": (Prediction.V, 1.0), "edm": (Prediction.EDM, 0.5), "eps": (Prediction.EPS, 1.0)}


class ModelSamplingContinuousEDM(Node):
    """Sample a model trained on continuous noise levels from sigma_min to sigma_max (EDM, Karras
    et al. 2022) instead of SD's 1,000 discrete timesteps: the network's timestep is 0.25 * ln(sigma).
    CosXL and its edit model: v_prediction, 0.002 to 120; edm: EDM's own output (sigma_data 0.5);
    eps: noise. The schedulers read the new range (karras and exponential from sigma_min to sigma_max)."""

    category = "model"

    class Inputs(NodeInputs):
        model: MODEL.annotation
        sampling: Literal[tuple(CONTINUOUS_PREDICTIONS)] = "v_prediction"  # type: ignore[valid-type]
        sigma_max: float = Field(120.0, gt=0.0, le=1000.0, description="The highest noise level.")
        sigma_min: float = Field(0.002, gt=0.0, le=1000.0, description="The lowest noise level.")

    class Outputs(NodeOutputs):
        model: MODEL.annotation

    def run(self, inputs: Inputs, ctx: RunContext) -> Outputs:
        model: DiffusionModel = inputs.model
        if model.sampling.prediction is Prediction.FLOW:
            raise InputError("model", f"ModelSamplingContinuousEDM applies to diffusion models with VE noise "
                                      f"(SD1.x, SD2.x, SDXL); {model.family.label} is a rectified-flow model")
        prediction, sigma_data = CONTINUOUS_PREDICTIONS[inputs.sampling]
        try:
            sampling = ModelSampling.continuous(prediction, inputs.sigma_min, inputs.sigma_max, sigma_data)
        except ModelSamplingError as error:
            raise InputError("sigma_min", str(error)) from None
        return self.Outputs(model=model.with_sampling(sampling))


NODES: list[type[Node]] = [ModelSamplingContinuousEDM]
