"""Import ComfyUI workflows built from its core nodes: the API format (`{"3": {"class_type":
"KSampler", "inputs": {..., "model": ["4", 0]}}}`) and the editor's UI format (`{"nodes": [...],
"links": [[id, from_node, from_slot, to_node, to_slot, type], ...]}`, its subgraphs and group nodes
expanded into their nodes, see comfyui_subgraphs) become workflows of this pack's nodes, also when
a request carries them (the body of ComfyUI's POST /prompt, a hosted worker's {"input": {"workflow":
...}}). ComfyUI node ids are kept; UI positions go to the `ui` block."""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from nodegraph.importers import WorkflowImportError
from nodegraph.node import Node
from nodegraph.validation import ValidationIssue, bypass_feed
from nodegraph.workflow import BYPASS, MUTE, NodeEntry

from .comfyui_subgraphs import (
    MODE_BYPASSED,
    MODE_MUTED,
    NOTE_TYPES,
    PRIMITIVE,
    REROUTE,
    expand_reusable_nodes,
    input_name,
    node_position,
    read_link,
)
from .comfyui_ui import groups, node_decorations, notes, reroute_points

logger = logging.getLogger(__name__)

API_FORMAT = "ComfyUI API format"
UI_FORMAT = "ComfyUI UI format"
# UI node modes as our document's node modes.
UI_MODES = {MODE_MUTED: MUTE, MODE_BYPASSED: BYPASS}

# Widgets of the ComfyUI editor that are no inputs of the node (some API exports carry them too):
# what to do with a seed after each run, and the image upload button (which older API exports
# carry as "choose file to upload").
UI_ONLY_WIDGETS = frozenset({"control_after_generate", "upload", "choose file to upload"})
# Nodes that show an image: newer editors save their image preview's (empty) value after their widgets.
IMAGE_PREVIEW_NODES = frozenset({"LoadImage", "LoadImageMask", "SaveImage", "PreviewImage", "SaveAnimatedWEBP",
                                 "SaveAnimatedPNG"})


class UnmappableValue(ValueError):
    """A ComfyUI input value with no equivalent here; the message says what would be accepted."""


def _stop_layer_to_clip_skip(value: Any) -> int:
    # ComfyUI counts from the end with negative numbers (-1 = last layer); clip skip 1 is the last.
    if isinstance(value, bool) or not isinstance(value, int) or value > -1:
        raise UnmappableValue(f"expected a layer from -1 (the last) to -24, got {value!r}")
    return -value


def _enable_to_bool(value: Any) -> bool:
    if value not in ("enable", "disable"):
        raise UnmappableValue(f"expected 'enable' or 'disable', got {value!r}")
    return value == "enable"


def _image_resize_method(value: Any) -> Any:
    # ComfyUI's image nodes call their nearest-neighbour filter by the latent nodes' name for it.
    return "nearest" if value == "nearest-exact" else value


@dataclass(frozen=True)
class NodeMapping:
    """How one ComfyUI node type becomes one of this pack's nodes."""

    type: str
    inputs: Mapping[str, str]  # ComfyUI input name -> ours (links and literals)
    outputs: tuple[str, ...] = ()  # our output names, in ComfyUI's output slot order
    widgets: tuple[str, ...] = ()  # ComfyUI input names in the UI format's `widgets_values` order
    values: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # ComfyUI input -> value converter
    fixed: Mapping[str, Any] = field(default_factory=dict)  # no counterpart; only this value (our behaviour) maps
    ignored: frozenset[str] = frozenset()  # no counterpart, and no effect on the models this pack runs
    needs_model: bool = False  # our node takes a model link that ComfyUI's does not have
    # Literal inputs of our node that ComfyUI's node has no input for (what it does implicitly).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # How many of the last widgets older ComfyUI versions do not have (files saved by them stop early).
    later_widgets: int = 0


def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


def _per_block_merge_mappings() -> dict[str, NodeMapping]:
    """ModelMergeSD1/SD2/SDXL: one ratio per U-Net block, named by its key prefix (SD1's end in a dot,
    SDXL's do not), in ComfyUI's widget order."""
    from .merging import MergeModelBlocksSD1, MergeModelBlocksSDXL, block_input_name

    mappings = {}
    for comfy_type, node_class, dotted in (("ModelMergeSD1", MergeModelBlocksSD1, True),
                                           ("ModelMergeSD2", MergeModelBlocksSD1, True),
                                           ("ModelMergeSDXL", MergeModelBlocksSDXL, False)):
        theirs = [prefix if dotted or prefix in ("time_embed.", "label_emb.", "out.") else prefix.rstrip(".")
                  for prefix in node_class.block_prefixes]
        ours = {name: block_input_name(prefix) for name, prefix in zip(theirs, node_class.block_prefixes)}
        mappings[comfy_type] = NodeMapping(node_class.type_name, {**_same("model1", "model2"), **ours}, ("model",),
                                           tuple(theirs))
    return mappings


MAPPINGS: Mapping[str, NodeMapping] = MappingProxyType({
    "CheckpointLoaderSimple": NodeMapping("LoadCheckpoint", {"ckpt_name": "name"}, ("model", "clip", "vae"),
                                          ("ckpt_name",)),
    # Newer ComfyUI versions added the encoder type, then the (advanced) load device, to the text-encoder loaders.
    "UNETLoader": NodeMapping("LoadDiffusionModel", {"unet_name": "name", "weight_dtype": "weight_dtype"}, ("model",),
                              ("unet_name", "weight_dtype"), later_widgets=1),
    "CLIPLoader": NodeMapping("LoadTextEncoder", {"clip_name": "name", **_same("type", "device")}, ("clip",),
                              ("clip_name", "type", "device"), later_widgets=2),
    "DualCLIPLoader": NodeMapping(
        "LoadTextEncoders", {"clip_name1": "name1", "clip_name2": "name2", **_same("type", "device")}, ("clip",),
        ("clip_name1", "clip_name2", "type", "device"), later_widgets=1),
    "TripleCLIPLoader": NodeMapping(
        "LoadTextEncoders", {"clip_name1": "name1", "clip_name2": "name2", "clip_name3": "name3"}, ("clip",),
        ("clip_name1", "clip_name2", "clip_name3"), defaults={"type": "sd3"}),
    "VAELoader": NodeMapping("LoadVAE", {"vae_name": "name"}, ("vae",), ("vae_name",)),
    "LoraLoader": NodeMapping(
        "LoadLora", {"lora_name": "name", **_same("model", "clip", "strength_model", "strength_clip")},
        ("model", "clip"), ("lora_name", "strength_model", "strength_clip")),
    "LoraLoaderModelOnly": NodeMapping(
        "LoadLora", {"lora_name": "name", **_same("model", "strength_model")}, ("model",),
        ("lora_name", "strength_model")),
    "unCLIPCheckpointLoader": NodeMapping("LoadUnclipCheckpoint", {"ckpt_name": "name"},
                                          ("model", "clip", "vae", "clip_vision"), ("ckpt_name",)),
    "CLIPVisionLoader": NodeMapping("LoadCLIPVision", {"clip_name": "name"}, ("clip_vision",), ("clip_name",)),
    # Older ComfyUI versions had no crop widget (they cropped the centre).
    "CLIPVisionEncode": NodeMapping("CLIPVisionEncode", _same("clip_vision", "image", "crop"), ("clip_vision_output",),
                                    ("crop",), later_widgets=1),
    "unCLIPConditioning": NodeMapping(
        "UnclipConditioning", _same("conditioning", "clip_vision_output", "strength", "noise_augmentation"),
        ("conditioning",), ("strength", "noise_augmentation")),
    "ControlNetLoader": NodeMapping("LoadControlNet", {"control_net_name": "name"}, ("control_net",),
                                    ("control_net_name",)),
    "SetUnionControlNetType": NodeMapping("SetUnionControlNetType", _same("control_net", "type"), ("control_net",),
                                          ("type",)),
    "CLIPTextEncode": NodeMapping("TextEncode", _same("clip", "text"), ("conditioning",), ("text",)),
    "CLIPTextEncodeSDXL": NodeMapping(
        "TextEncodeSDXL",
        {"crop_w": "crop_left", "crop_h": "crop_top",
         **_same("clip", "width", "height", "target_width", "target_height", "text_g", "text_l")},
        ("conditioning",),
        ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l")),
    "CLIPTextEncodeSD3": NodeMapping(
        "TextEncodeSD3", _same("clip", "clip_l", "clip_g", "t5xxl", "empty_padding"), ("conditioning",),
        ("clip_l", "clip_g", "t5xxl", "empty_padding")),
    "CLIPTextEncodeFlux": NodeMapping("TextEncodeFlux", _same("clip", "clip_l", "t5xxl", "guidance"), ("conditioning",),
                                      ("clip_l", "t5xxl", "guidance")),
    "FluxGuidance": NodeMapping("FluxGuidance", _same("conditioning", "guidance"), ("conditioning",), ("guidance",)),
    "CLIPSetLastLayer": NodeMapping("SetClipSkip", {"clip": "clip", "stop_at_clip_layer": "clip_skip"}, ("clip",),
                                    ("stop_at_clip_layer",), {"stop_at_clip_layer": _stop_layer_to_clip_skip}),
    "ConditioningCombine": NodeMapping("ConditioningCombine", {"conditioning_1": "a", "conditioning_2": "b"},
                                       ("conditioning",)),
    "ConditioningConcat": NodeMapping("ConditioningConcat",
                                      {"conditioning_to": "target", "conditioning_from": "source"}, ("conditioning",)),
    "ConditioningSetArea": NodeMapping(
        "ConditioningSetArea", _same("conditioning", "width", "height", "x", "y", "strength"), ("conditioning",),
        ("width", "height", "x", "y", "strength")),
    "ConditioningSetMask": NodeMapping(
        "ConditioningSetMask", _same("conditioning", "mask", "strength"), ("conditioning",),
        ("strength", "set_cond_area"), fixed={"set_cond_area": "default"}),
    "ConditioningSetTimestepRange": NodeMapping("ConditioningSetTimestepRange", _same("conditioning", "start", "end"),
                                                ("conditioning",), ("start", "end")),
    "ConditioningZeroOut": NodeMapping("ConditioningZeroOut", _same("conditioning"), ("conditioning",)),
    # LoRA hooks (hooks.py): LoRAs acting only on the conditionings they are attached to.
    "CreateHookLora": NodeMapping(
        "CreateLoraHook", {"lora_name": "name", "prev_hooks": "previous", **_same("strength_model", "strength_clip")},
        ("hooks",), ("lora_name", "strength_model", "strength_clip")),
    "CreateHookLoraModelOnly": NodeMapping(
        "CreateLoraHook", {"lora_name": "name", "prev_hooks": "previous", "strength_model": "strength_model"},
        ("hooks",), ("lora_name", "strength_model"), defaults={"strength_clip": 0.0}),
    "SetHookKeyframes": NodeMapping("SetHookKeyframes", {"hooks": "hooks", "hook_kf": "keyframes"}, ("hooks",)),
    "CreateHookKeyframe": NodeMapping(
        "CreateHookKeyframe", {"strength_mult": "strength", "start_percent": "start_percent", "prev_hook_kf": "previous"},
        ("keyframes",), ("strength_mult", "start_percent")),
    "CreateHookKeyframesInterpolated": NodeMapping(
        "InterpolateHookKeyframes",
        {"keyframes_count": "count", "print_keyframes": "log_keyframes", "prev_hook_kf": "previous",
         **_same("strength_start", "strength_end", "interpolation", "start_percent", "end_percent")},
        ("keyframes",), ("strength_start", "strength_end", "interpolation", "start_percent", "end_percent",
                         "keyframes_count", "print_keyframes")),
    "CombineHooks2": NodeMapping("CombineHooks", {"hooks_A": "a", "hooks_B": "b"}, ("hooks",)),
    "CombineHooks4": NodeMapping("CombineHooks", {f"hooks_{x}": x.lower() for x in "ABCD"}, ("hooks",)),
    "CombineHooks8": NodeMapping("CombineHooks", {f"hooks_{x}": x.lower() for x in "ABCDEFGH"}, ("hooks",)),
    "SetClipHooks": NodeMapping("SetClipHooks", _same("clip", "apply_to_conds", "schedule_clip", "hooks"), ("clip",),
                                ("apply_to_conds", "schedule_clip")),
    "ConditioningSetProperties": NodeMapping(
        "SetConditioningProperties",
        {"cond_NEW": "conditioning", **_same("strength", "set_cond_area", "mask", "hooks", "timesteps")},
        ("conditioning",), ("strength", "set_cond_area")),
    "ConditioningSetPropertiesAndCombine": NodeMapping(
        "AddConditioningWithProperties",
        {"cond": "conditioning", "cond_NEW": "added", **_same("strength", "set_cond_area", "mask", "hooks", "timesteps")},
        ("conditioning",), ("strength", "set_cond_area")),
    "PairConditioningSetProperties": NodeMapping(
        "SetConditioningPairProperties",
        {"positive_NEW": "positive", "negative_NEW": "negative",
         **_same("strength", "set_cond_area", "mask", "hooks", "timesteps")},
        ("positive", "negative"), ("strength", "set_cond_area")),
    "PairConditioningSetPropertiesAndCombine": NodeMapping(
        "AddConditioningPairWithProperties",
        {"positive_NEW": "added_positive", "negative_NEW": "added_negative",
         **_same("positive", "negative", "strength", "set_cond_area", "mask", "hooks", "timesteps")},
        ("positive", "negative"), ("strength", "set_cond_area")),
    "SetModelHooksOnCond": NodeMapping("SetModelHooksOnConditioning", _same("conditioning", "hooks"), ("conditioning",)),
    "ConditioningTimestepsRange": NodeMapping("TimestepsRange", _same("start_percent", "end_percent"),
                                              ("range", "before", "after"), ("start_percent", "end_percent")),
    "PhotoMakerLoader": NodeMapping("LoadPhotoMaker", {"photomaker_model_name": "name"}, ("photomaker",),
                                    ("photomaker_model_name",)),
    "PhotoMakerEncode": NodeMapping("PhotoMakerEncode", _same("photomaker", "image", "clip", "text"),
                                    ("conditioning",), ("text",)),
    # Newer ComfyUI versions pass a VAE (optional), which SD3 and Flux ControlNets encode the control image with.
    "ControlNetApplyAdvanced": NodeMapping(
        "ApplyControlNet",
        {"start_percent": "start", "end_percent": "end",
         **_same("positive", "negative", "control_net", "image", "strength", "vae")},
        ("positive", "negative"), ("strength", "start_percent", "end_percent")),
    # The same with the VAE required (ComfyUI's node for SD3 and Flux ControlNets).
    "ControlNetApplySD3": NodeMapping(
        "ApplyControlNet",
        {"start_percent": "start", "end_percent": "end",
         **_same("positive", "negative", "control_net", "vae", "image", "strength")},
        ("positive", "negative"), ("strength", "start_percent", "end_percent")),
    # The older one-conditioning form: its ControlNet also guides the negative side (see ApplyControlNetSimple).
    "ControlNetApply": NodeMapping("ApplyControlNetSimple", _same("conditioning", "control_net", "image", "strength"),
                                   ("conditioning",), ("strength",)),
    "EmptyLatentImage": NodeMapping("EmptyLatent", _same("width", "height", "batch_size"), ("latent",),
                                    ("width", "height", "batch_size"), needs_model=True),
    # Our EmptyLatent shapes the latent for its model (16 channels for SD3 and Flux).
    "EmptySD3LatentImage": NodeMapping("EmptyLatent", _same("width", "height", "batch_size"), ("latent",),
                                       ("width", "height", "batch_size"), needs_model=True),
    "LatentUpscale": NodeMapping(
        "LatentUpscale", {"samples": "latent", "upscale_method": "method", **_same("width", "height", "crop")},
        ("latent",), ("upscale_method", "width", "height", "crop")),
    "LatentUpscaleBy": NodeMapping("LatentUpscaleBy",
                                   {"samples": "latent", "upscale_method": "method", "scale_by": "scale_by"},
                                   ("latent",), ("upscale_method", "scale_by")),
    "LatentComposite": NodeMapping(
        "LatentComposite", {"samples_to": "destination", "samples_from": "source", **_same("x", "y", "feather")},
        ("latent",), ("x", "y", "feather")),
    "LatentFromBatch": NodeMapping("LatentFromBatch", {"samples": "latent", **_same("batch_index", "length")},
                                   ("latent",), ("batch_index", "length")),
    "RepeatLatentBatch": NodeMapping("RepeatLatentBatch", {"samples": "latent", "amount": "amount"}, ("latent",),
                                     ("amount",)),
    "SetLatentNoiseMask": NodeMapping("SetLatentNoiseMask", {"samples": "latent", "mask": "mask"}, ("latent",)),
    "VAEDecode": NodeMapping("VAEDecode", {"samples": "latent", "vae": "vae"}, ("image",)),
    "VAEEncode": NodeMapping("VAEEncode", {"pixels": "image", "vae": "vae"}, ("latent",)),
    # The temporal tile sizes of newer ComfyUI only apply to video VAEs; overlap came after tile_size.
    "VAEDecodeTiled": NodeMapping(
        "VAEDecodeTiled", {"samples": "latent", **_same("vae", "tile_size", "overlap")}, ("image",),
        ("tile_size", "overlap", "temporal_size", "temporal_overlap"),
        ignored=frozenset({"temporal_size", "temporal_overlap"}), later_widgets=3),
    "VAEEncodeTiled": NodeMapping(
        "VAEEncodeTiled", {"pixels": "image", **_same("vae", "tile_size", "overlap")}, ("latent",),
        ("tile_size", "overlap", "temporal_size", "temporal_overlap"),
        ignored=frozenset({"temporal_size", "temporal_overlap"}), later_widgets=3),
    "VAEEncodeForInpaint": NodeMapping(
        "VAEEncodeForInpaint", {"pixels": "image", **_same("vae", "mask", "grow_mask_by")}, ("latent",),
        ("grow_mask_by",)),
    "KSampler": NodeMapping(
        "KSampler",
        {"latent_image": "latent",
         **_same("model", "positive", "negative", "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")},
        ("latent",),
        ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise")),
    "KSamplerAdvanced": NodeMapping(
        "KSamplerAdvanced",
        {"latent_image": "latent", "noise_seed": "seed",
         **_same("model", "positive", "negative", "add_noise", "steps", "cfg", "sampler_name", "scheduler",
                 "start_at_step", "end_at_step", "return_with_leftover_noise")},
        ("latent",),
        ("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
         "start_at_step", "end_at_step", "return_with_leftover_noise"),
        {"add_noise": _enable_to_bool, "return_with_leftover_noise": _enable_to_bool}),
    "RandomNoise": NodeMapping("RandomNoise", {"noise_seed": "seed"}, ("noise",),
                               ("noise_seed", "control_after_generate")),
    "DisableNoise": NodeMapping("DisableNoise", {}, ("noise",)),
    "BasicScheduler": NodeMapping("Scheduler", _same("model", "scheduler", "steps", "denoise"), ("sigmas",),
                                  ("scheduler", "steps", "denoise")),
    # Older ComfyUI versions had no denoise widget.
    "SDTurboScheduler": NodeMapping("SDTurboScheduler", _same("model", "steps", "denoise"), ("sigmas",),
                                    ("steps", "denoise"), later_widgets=1),
    "SplitSigmas": NodeMapping("SplitSigmas", _same("sigmas", "step"), ("high", "low"), ("step",)),
    "KSamplerSelect": NodeMapping("SelectSampler", _same("sampler_name"), ("sampler",), ("sampler_name",)),
    "CFGGuider": NodeMapping("Guider", _same("model", "positive", "negative", "cfg"), ("guider",), ("cfg",)),
    "BasicGuider": NodeMapping("BasicGuider", _same("model", "conditioning"), ("guider",)),
    "ModelSamplingSD3": NodeMapping("ModelSamplingSD3", _same("model", "shift"), ("model",), ("shift",)),
    "ModelSamplingFlux": NodeMapping(
        "ModelSamplingFlux", _same("model", "max_shift", "base_shift", "width", "height"), ("model",),
        ("max_shift", "base_shift", "width", "height")),
    "ModelSamplingDiscrete": NodeMapping("ModelSamplingDiscrete", _same("model", "sampling", "zsnr"), ("model",),
                                         ("sampling", "zsnr")),
    # Older ComfyUI versions had no style widget (they guided the regular way).
    "DualCFGGuider": NodeMapping(
        "DualGuider", _same("model", "cond1", "cond2", "negative", "cfg_conds", "cfg_cond2_negative", "style"),
        ("guider",), ("cfg_conds", "cfg_cond2_negative", "style"), later_widgets=1),
    "InstructPixToPixConditioning": NodeMapping(
        "InstructPix2PixConditioning", {"pixels": "image", **_same("positive", "negative", "vae")},
        ("positive", "negative", "latent")),
    # Older ComfyUI versions had no noise_mask widget (the mask was always the latent's noise mask, our
    # default) and no DifferentialDiffusion strength.
    "InpaintModelConditioning": NodeMapping(
        "InpaintModelConditioning", {"pixels": "image", **_same("positive", "negative", "vae", "mask", "noise_mask")},
        ("positive", "negative", "latent"), ("noise_mask",), later_widgets=1),
    "DifferentialDiffusion": NodeMapping("DifferentialDiffusion", _same("model", "strength"), ("model",),
                                         ("strength",), later_widgets=1),
    "ReferenceLatent": NodeMapping("ReferenceLatent", _same("conditioning", "latent"), ("conditioning",)),
    "FluxKontextImageScale": NodeMapping("KontextImageScale", _same("image"), ("image",)),
    "ImageStitch": NodeMapping(
        "ImageStitch", _same("image1", "direction", "match_image_size", "spacing_width", "spacing_color", "image2"),
        ("image",), ("direction", "match_image_size", "spacing_width", "spacing_color")),
    "SetFirstSigma": NodeMapping("SetFirstSigma", _same("sigmas", "sigma"), ("sigmas",), ("sigma",)),
    # ComfyUI's node takes the model and an inductor or cudagraphs backend; some forks add torch.compile's
    # options, of which the mode maps and the rest change nothing in what is computed.
    "TorchCompileModel": NodeMapping(
        "CompileModel", _same("model", "mode"), ("model",), ("backend",),
        fixed={"backend": "inductor", "object_patch": "diffusion_model"},
        ignored=frozenset({"fullgraph", "dynamic", "torch_tensorrt_optimization_level"})),
    "StyleModelLoader": NodeMapping("LoadStyleModel", {"style_model_name": "name"}, ("style_model",),
                                    ("style_model_name",)),
    # Older ComfyUI versions had no strength widgets (the tokens went in as they were: 1, multiply).
    "StyleModelApply": NodeMapping(
        "ApplyStyleModel", _same("conditioning", "style_model", "clip_vision_output", "strength", "strength_type"),
        ("conditioning",), ("strength", "strength_type"), later_widgets=2),
    "SamplerCustom": NodeMapping(
        "SamplerCustom",
        {"latent_image": "latent",
         **_same("model", "add_noise", "noise_seed", "cfg", "positive", "negative", "sampler", "sigmas")},
        ("latent", "denoised"), ("add_noise", "noise_seed", "control_after_generate", "cfg")),
    "SamplerCustomAdvanced": NodeMapping(
        "Sample", {"latent_image": "latent", **_same("noise", "guider", "sampler", "sigmas")}, ("latent", "denoised")),
    "SaveImage": NodeMapping("SaveImage", _same("images", "filename_prefix"), (), ("filename_prefix",)),
    "SaveAnimatedWEBP": NodeMapping(
        "SaveAnimatedWebP", _same("images", "filename_prefix", "fps", "lossless", "quality", "method"), (),
        ("filename_prefix", "fps", "lossless", "quality", "method")),
    "SaveAnimatedPNG": NodeMapping("SaveAnimatedPNG", _same("images", "filename_prefix", "fps", "compress_level"), (),
                                   ("filename_prefix", "fps", "compress_level")),
    "PreviewImage": NodeMapping("PreviewImage", _same("images")),
    "LoadImage": NodeMapping("LoadImage", _same("image"), ("image", "mask"), ("image", "upload")),
    "LoadImageMask": NodeMapping("LoadMask", _same("image", "channel"), ("mask",), ("image", "channel", "upload")),
    "ImageScale": NodeMapping(
        "ImageScale", {"upscale_method": "method", **_same("image", "width", "height", "crop")}, ("image",),
        ("upscale_method", "width", "height", "crop"), {"upscale_method": _image_resize_method}),
    "ImageScaleBy": NodeMapping("ImageScaleBy", {"image": "image", "upscale_method": "method", "scale_by": "factor"},
                                ("image",), ("upscale_method", "scale_by"), {"upscale_method": _image_resize_method}),
    # resolution_steps came later.
    "ImageScaleToTotalPixels": NodeMapping(
        "ImageScaleToTotalPixels",
        {"upscale_method": "method", **_same("image", "megapixels", "resolution_steps")}, ("image",),
        ("upscale_method", "megapixels", "resolution_steps"), {"upscale_method": _image_resize_method},
        later_widgets=1),
    "Canny": NodeMapping("CannyEdges", _same("image", "low_threshold", "high_threshold"), ("image",),
                         ("low_threshold", "high_threshold")),
    "ImagePadForOutpaint": NodeMapping(
        "PadForOutpaint", _same("image", "left", "top", "right", "bottom", "feathering"), ("image", "mask"),
        ("left", "top", "right", "bottom", "feathering")),
    "ImageInvert": NodeMapping("InvertImage", _same("image"), ("image",)),
    "InvertMask": NodeMapping("InvertMask", _same("mask"), ("mask",)),
    "ImageToMask": NodeMapping("ImageToMask", _same("image", "channel"), ("mask",), ("channel",)),
    "MaskToImage": NodeMapping("MaskToImage", _same("mask"), ("image",)),
    "ImageBatch": NodeMapping("ImageBatch", _same("image1", "image2"), ("image",)),
    "ImageCompositeMasked": NodeMapping(
        "ImageCompositeMasked", _same("destination", "source", "x", "y", "mask"), ("image",),
        ("x", "y", "resize_source"), fixed={"resize_source": False}),
    # Model merging (merging.py): the merged model is model1 with model2's weights patched in.
    "ModelMergeSimple": NodeMapping("MergeModels", _same("model1", "model2", "ratio"), ("model",), ("ratio",)),
    "ModelMergeAdd": NodeMapping("AddModels", _same("model1", "model2"), ("model",)),
    "ModelMergeSubtract": NodeMapping("SubtractModels", _same("model1", "model2", "multiplier"), ("model",),
                                      ("multiplier",)),
    "ModelMergeBlocks": NodeMapping("MergeModelBlocks", _same("model1", "model2", "input", "middle", "out"),
                                    ("model",), ("input", "middle", "out")),
    **_per_block_merge_mappings(),
    "CLIPMergeSimple": NodeMapping("MergeTextEncoders", _same("clip1", "clip2", "ratio"), ("clip",), ("ratio",)),
    "CLIPMergeAdd": NodeMapping("AddTextEncoders", _same("clip1", "clip2"), ("clip",)),
    "CLIPMergeSubtract": NodeMapping("SubtractTextEncoders", _same("clip1", "clip2", "multiplier"), ("clip",),
                                     ("multiplier",)),
    "ModelSamplingContinuousEDM": NodeMapping(
        "ModelSamplingContinuousEDM", _same("model", "sampling", "sigma_max", "sigma_min"), ("model",),
        ("sampling", "sigma_max", "sigma_min")),
    "DiffControlNetLoader": NodeMapping("LoadDiffControlNet", {"model": "model", "control_net_name": "name"},
                                        ("control_net",), ("control_net_name",)),
    "HypernetworkLoader": NodeMapping("LoadHypernetwork", {"hypernetwork_name": "name", **_same("model", "strength")},
                                      ("model",), ("hypernetwork_name", "strength")),
    "GLIGENLoader": NodeMapping("LoadGligen", {"gligen_name": "name"}, ("gligen",), ("gligen_name",)),
    "GLIGENTextBoxApply": NodeMapping(
        "ApplyGligenTextBox",
        {"conditioning_to": "conditioning", "gligen_textbox_model": "gligen",
         **_same("clip", "text", "width", "height", "x", "y")},
        ("conditioning",), ("text", "width", "height", "x", "y")),
})


@dataclass(frozen=True)
class SourceRef:
    """A ComfyUI link: output slot `slot` of node `node`."""

    node: str
    slot: int


@dataclass
class ComfyNode:
    """One ComfyUI node, read from either format: inputs are literal values or SourceRefs."""

    id: str
    type: str
    inputs: dict[str, Any]
    pos: list[float] | None = None
    # From the UI format only: the node's mode in our document (None: it runs), its title, colour
    # and collapsed state (comfyui_ui.node_decorations), the reroutes each input's link crossed (nearest first), and
    # for a bypassed node which of its inputs ComfyUI passes to each used output slot.
    mode: str | None = None
    ui: dict[str, Any] = field(default_factory=dict)
    reroutes: dict[str, list[str]] = field(default_factory=dict)
    feeds: dict[int, str | None] = field(default_factory=dict)


class _Problems:
    """Everything that stops a conversion, gathered so that all of it is reported at once."""

    def __init__(self, importer: str) -> None:
        self.importer = importer
        self.unsupported: dict[str, list[str]] = defaultdict(list)
        self.issues: list[ValidationIssue] = []

    def add(self, code: str, message: str, node_id: str | None = None, input_name: str | None = None) -> None:
        self.issues.append(ValidationIssue(code, message, node_id, input_name, {"importer": self.importer}))

    def raise_any(self) -> None:
        if self.unsupported or self.issues:
            raise WorkflowImportError(self.importer, {t: ids for t, ids in self.unsupported.items()}, self.issues)


def _node_classes() -> dict[str, type[Node]]:
    from . import NODES  # the pack's own list; imported late because the pack imports this module

    return {node_class.type_name: node_class for node_class in NODES}


def _as_source(value: Any) -> SourceRef | None:
    """API-format links are `[node_id, output_index]`."""
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return SourceRef(str(value[0]), value[1])
    return None


# --- API format -------------------------------------------------------------------------------

# Requests that carry a workflow rather than being one: the body of ComfyUI's POST /prompt
# ({"prompt": <graph>, "client_id": ...}) and what hosted ComfyUI workers are sent ({"input":
# {"workflow": <graph>, "images": [{"name": ..., "image": <base64>}]}}).
PROMPT_REQUEST = '{"prompt": <API-format graph>}'
WORKER_REQUEST = '{"input": {"workflow": <API- or UI-format graph>}}'


@dataclass(frozen=True)
class _Request:
    shape: str  # what such a request looks like, for messages
    workflow: Any  # what it holds where the workflow belongs
    images: int  # input images uploaded with it


def _is_api_node(value: Any) -> bool:
    return isinstance(value, dict) and "class_type" in value


def _request(document: Any) -> _Request | None:
    """The request `document` is (an API graph may have a node called "prompt" or "input": those
    are nodes), or None."""
    if not isinstance(document, dict) or "nodes" in document:
        return None
    if "prompt" in document and not _is_api_node(document["prompt"]):
        return _Request(PROMPT_REQUEST, document["prompt"], 0)
    if "input" in document and not _is_api_node(document["input"]):
        body = document["input"]
        images = body.get("images") if isinstance(body, dict) else None
        return _Request(WORKER_REQUEST, body.get("workflow") if isinstance(body, dict) else None,
                        len(images) if isinstance(images, list) else 0)
    return None


def _carried(document: Any) -> Any:
    """The workflow a request carries, or the document itself when it is no request."""
    request = _request(document)
    return document if request is None else request.workflow


def _found(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        keys = ", ".join(map(str, list(value)[:8])) + (", ..." if len(value) > 8 else "")
        return f"an object with keys {keys}" if value else "an empty object"
    return f"a JSON {type(value).__name__ if not isinstance(value, list) else 'array'}"


def _api_graph(document: Any) -> dict[str, Any] | None:
    """The node table of an API-format document (bare, or carried by a request)."""
    document = _carried(document)
    if not isinstance(document, dict) or not document:
        return None
    if all(isinstance(node, dict) and isinstance(node.get("class_type"), str) for node in document.values()):
        return document
    return None


def read_api_nodes(document: Any) -> list[ComfyNode]:
    """The nodes of an API-format document."""
    graph = _api_graph(document)
    if graph is None:
        raise ValueError("not a ComfyUI API-format document")
    nodes, problems = [], _Problems(API_FORMAT)
    for node_id, node in graph.items():
        inputs = node.get("inputs") or {}
        if not isinstance(inputs, dict):
            problems.add("invalid_document", f"'inputs' must be an object, got {inputs!r}", str(node_id))
            continue
        nodes.append(ComfyNode(str(node_id), node["class_type"],
                               {name: _as_source(value) or value for name, value in inputs.items()}))
    problems.raise_any()
    return nodes


# --- UI format --------------------------------------------------------------------------------

def _is_ui_document(document: Any) -> bool:
    return (isinstance(document, dict) and isinstance(document.get("nodes"), list)
            and isinstance(document.get("links", []), list)
            and all(isinstance(node, dict) and "id" in node and isinstance(node.get("type"), str)
                    for node in document["nodes"]))


@dataclass(frozen=True)
class _UILink:
    source: str
    slot: int
    type: Any


def _ui_links(document: dict[str, Any], problems: _Problems) -> dict[int, _UILink]:
    links = {}
    for entry in document.get("links") or []:
        read = read_link(entry)
        if read is None:
            problems.add("invalid_link", f"cannot read link {entry!r}")
            continue
        link_id, link = read
        links[link_id] = _UILink(link.origin, link.origin_slot, link.type)
    return links


def _widget_values(node: dict[str, Any], mapping: NodeMapping, problems: _Problems) -> dict[str, Any]:
    """The node's widget values by ComfyUI input name."""
    node_id, values = str(node["id"]), node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):
        return {name: value for name, value in values.items() if name not in UI_ONLY_WIDGETS}
    if not isinstance(values, list):
        problems.add("invalid_widgets", f"widgets_values must be a list, got {values!r}", node_id)
        return {}
    names = mapping.widgets
    real = [name for name in names if name not in UI_ONLY_WIDGETS]
    if node["type"] in IMAGE_PREVIEW_NODES and len(values) > len(real) and values[-1] == "":
        values = values[:-1]  # the image preview's placeholder
    if len(values) != len(names):
        # Files from editors that do not store the UI-only widgets hold just the real ones.
        names = tuple(name for name in names if name not in UI_ONLY_WIDGETS)
    if len(names) - mapping.later_widgets <= len(values) < len(names):
        names = names[:len(values)]
    if len(values) != len(names):
        problems.add("invalid_widgets", f"{node['type']} has {len(mapping.widgets)} widget values "
                                        f"({', '.join(mapping.widgets)}), the file has {len(values)}: {values!r}",
                     node_id)
        return {}
    return {name: value for name, value in zip(names, values) if name not in UI_ONLY_WIDGETS}


def _ui_mode(node: dict[str, Any]) -> str | None:
    """Our mode for a UI node that is muted or bypassed; None for one that runs (files from outside
    may hold anything in `mode`: what is no known mode runs, as in ComfyUI)."""
    mode = node.get("mode", 0)
    return UI_MODES.get(mode) if isinstance(mode, int) else None


def read_ui_nodes(document: Any, problems: _Problems | None = None,
                  resolved: frozenset[str] = frozenset()) -> list[ComfyNode]:
    """The nodes of a UI-format document, with links resolved through reroutes and primitive nodes
    (which become literal values). A muted or bypassed node of a type that maps is kept with its
    mode (ComfyNode.mode); other muted ones are left out, other bypassed ones passed through, as
    are those named in `resolved` (see ComfyUIImporter). Raises WorkflowImportError."""
    own_problems = problems is None
    problems = problems or _Problems(UI_FORMAT)
    nodes, _ = _read_ui(document, problems, resolved)
    if own_problems:
        problems.raise_any()
    return nodes


def _read_ui(document: Any, problems: _Problems,
             resolved: frozenset[str]) -> tuple[list[ComfyNode], dict[str, Any]]:
    """read_ui_nodes' nodes, and the document with its subgraphs and group nodes expanded."""
    if not _is_ui_document(document):
        raise ValueError("not a ComfyUI UI-format document")
    document = expand_reusable_nodes(document, problems.add)
    links = _ui_links(document, problems)
    by_id = {str(node["id"]): node for node in document["nodes"]}

    def kept_mode(node: dict[str, Any]) -> str | None:
        """The mode a muted or bypassed node keeps in our document; None if it runs or is resolved."""
        mode = _ui_mode(node)
        return mode if mode is not None and node["type"] in MAPPINGS and str(node["id"]) not in resolved else None

    def linked_inputs(node: dict[str, Any]) -> list[tuple[str, Any, int]]:
        """(input name, input type, link id) for each connected input."""
        return [(input_name(entry), entry.get("type"), entry["link"]) for entry in node.get("inputs") or []
                if isinstance(entry, dict) and entry.get("link") is not None]

    def resolve(link_id: Any, target: str, input_name: str, crossed: list[str],
                seen: frozenset[str] = frozenset()) -> Any:
        """What feeds an input: a SourceRef to a node of our document, or a literal from a primitive
        node. Reroutes passed on the way are added to `crossed`."""
        link = links.get(link_id) if isinstance(link_id, (int, str)) else None
        if link is None:
            problems.add("invalid_link", f"link {link_id!r} is not in the file's links", target, input_name)
            return None
        source = by_id.get(link.source)
        if source is None:
            problems.add("missing_node", f"linked to node {link.source}, which is not in the file", target, input_name)
            return None
        if link.source in seen:
            problems.add("invalid_link", f"links loop through node {link.source}", target, input_name)
            return None
        mode = source.get("mode", 0)
        if source["type"] == PRIMITIVE:
            values = source.get("widgets_values") or []
            if not values:
                problems.add("invalid_widgets", "the primitive node feeding this input holds no value", target,
                             input_name)
                return None
            return values[0]
        if kept_mode(source) is not None:
            return SourceRef(link.source, link.slot)
        if source["type"] == REROUTE or mode == MODE_BYPASSED:
            # A bypassed node hands each output the first connected input of the same type.
            candidates = linked_inputs(source)
            if mode == MODE_BYPASSED:
                candidates = [c for c in candidates if c[1] == link.type]
            if not candidates:
                what = "reroute" if source["type"] == REROUTE else f"bypassed {source['type']} node"
                problems.add("invalid_link", f"fed by {what} {link.source}, which passes nothing of type "
                                             f"{link.type} through", target, input_name)
                return None
            if source["type"] == REROUTE:
                crossed.append(link.source)
            return resolve(candidates[0][2], target, input_name, crossed, seen | {link.source})
        if mode == MODE_MUTED:
            problems.add("muted_source", f"fed by node {link.source} ({source['type']}), which is muted; "
                                         "mute this node too or unmute that one", target, input_name)
            return None
        return SourceRef(link.source, link.slot)

    nodes = []
    for node in document["nodes"]:
        node_id, node_type = str(node["id"]), node["type"]
        if node_type in NOTE_TYPES or node_type in (REROUTE, PRIMITIVE):
            continue
        mode = kept_mode(node)
        if mode is None and _ui_mode(node) is not None:
            continue
        mapping = MAPPINGS.get(node_type)
        inputs = _widget_values(node, mapping, problems) if mapping is not None else {}
        reroutes: dict[str, list[str]] = {}
        for name, _, link_id in linked_inputs(node):
            crossed: list[str] = []
            inputs[name] = resolve(link_id, node_id, name, crossed)
            if crossed and isinstance(inputs[name], SourceRef):
                reroutes[name] = crossed
        feeds: dict[int, str | None] = {}
        if mode == BYPASS:
            for link in links.values():  # what ComfyUI passes to each used output (see _bypass_disagrees)
                if link.source == node_id and link.slot not in feeds:
                    feeds[link.slot] = next((name for name, kind, _ in linked_inputs(node) if kind == link.type), None)
        nodes.append(ComfyNode(node_id, node_type, inputs, node_position(node), mode, node_decorations(node),
                                 reroutes, feeds))
    return nodes, document


# --- conversion ---------------------------------------------------------------------------------

def _check_choice(node_class: type[Node], our_input: str, value: Any) -> str | None:
    """Why `value` is not one of the input's fixed choices, or None if it is (or there are none)."""
    spec = node_class.specs().inputs.get(our_input)
    if spec is None or spec.choices is None or value in spec.choices:
        return None
    return f"{value!r} is not supported here (supported: {', '.join(map(str, spec.choices))})"


# Our node types that load a diffusion model (a latent-making node with no sampler takes the only one).
MODEL_LOADERS = frozenset({MAPPINGS["CheckpointLoaderSimple"].type, MAPPINGS["UNETLoader"].type,
                           MAPPINGS["unCLIPCheckpointLoader"].type})


def _linked_model(entry: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> Any:
    """The model link of a node: its own model input, or its guider's (SamplerCustomAdvanced)."""
    model = entry["inputs"].get("model")
    guider = entry["inputs"].get("guider")
    if model is None and isinstance(guider, dict) and "from" in guider:
        model = nodes.get(guider["from"], {}).get("inputs", {}).get("model")
    return model


def _model_source(node_id: str, nodes: dict[str, dict[str, Any]]) -> dict[str, str] | None:
    """The model a latent-making node is for: found at the first node downstream of it that takes a
    model (directly or through its guider), then traced upstream through model-to-model nodes
    (LoRAs, model sampling) to the loader. A node that feeds no such node (it would not run in
    ComfyUI) takes the workflow's only model loader, if it has one."""
    consumers: dict[str, list[str]] = defaultdict(list)
    for target, entry in nodes.items():
        for value in entry["inputs"].values():
            if isinstance(value, dict) and "from" in value:
                consumers[value["from"]].append(target)
    queue, seen = deque([node_id]), {node_id}
    while queue:
        current = queue.popleft()
        model = _linked_model(nodes[current], nodes) if current != node_id else None
        if isinstance(model, dict) and "from" in model:
            while True:
                upstream = nodes.get(model["from"], {}).get("inputs", {}).get("model")
                if not (model["output"] == "model" and isinstance(upstream, dict) and "from" in upstream):
                    return model
                model = upstream
        for target in consumers[current]:
            if target not in seen:
                seen.add(target)
                queue.append(target)
    loaders = [loader_id for loader_id, entry in nodes.items() if entry["type"] in MODEL_LOADERS]
    return {"from": loaders[0], "output": "model"} if len(loaders) == 1 else None


def _model_lost_to_unconverted(node_id: str, comfy_nodes: list[ComfyNode], converted: set[str]) -> bool:
    """Whether a latent-making node's model is unknown only because of nodes that were not
    converted (reported already, by type or by link): one downstream of it (an unsupported
    sampler), or one on the model links of a node downstream of it (its sampler's loader). A
    message about this node would then blame it for their problem."""
    by_id = {node.id: node for node in comfy_nodes}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in comfy_nodes:
        for value in node.inputs.values():
            if isinstance(value, SourceRef):
                consumers[value.node].append(node.id)
    downstream, queue = set(), deque([node_id])
    while queue:
        for target in consumers[queue.popleft()]:
            if target not in downstream:
                downstream.add(target)
                queue.append(target)
    if downstream - converted:
        return True
    model_links = deque(by_id[target].inputs.get(name) for target in downstream for name in ("model", "guider"))
    seen: set[str] = set()
    while model_links:
        link = model_links.popleft()
        if not isinstance(link, SourceRef) or link.node in seen:
            continue
        if link.node not in converted:
            return True
        seen.add(link.node)
        model_links.extend(by_id[link.node].inputs.get(name) for name in ("model", "guider"))
    return False


def _not_run(comfy_nodes: list[ComfyNode], classes: Mapping[str, type[Node]]) -> set[str]:
    """The nodes that no running output node needs (none in a file without one: validation reports
    that). ComfyUI validates and runs only its output nodes that are neither muted nor bypassed, and
    what feeds them."""
    by_id = {node.id: node for node in comfy_nodes}
    stack = [node.id for node in comfy_nodes
             if node.type in MAPPINGS and classes[MAPPINGS[node.type].type].output_node and node.mode is None]
    needed: set[str] = set()
    while stack:
        node_id = stack.pop()
        if node_id in needed or node_id not in by_id:
            continue
        needed.add(node_id)
        stack.extend(value.node for value in by_id[node_id].inputs.values() if isinstance(value, SourceRef))
    return {node.id for node in comfy_nodes if node.id not in needed} if needed else set()


def _linked_from(node_id: str, nodes: Mapping[str, dict[str, Any]]) -> bool:
    """Whether any of the converted `nodes` takes an input from node `node_id`."""
    return any(isinstance(value, dict) and value.get("from") == node_id
               for entry in nodes.values() for value in entry["inputs"].values())


def convert_nodes(comfy_nodes: list[ComfyNode], importer: str, problems: _Problems | None = None) -> dict[str, Any]:
    """A version-1 workflow document from ComfyUI nodes. Raises WorkflowImportError listing every
    unsupported node type by name and every input that cannot be mapped.

    A node that no output node needs and that lacks a required input is left out (logged): ComfyUI
    neither validates nor runs such a node, so files that run there carry half-connected ones (a
    ConditioningCombine with one input left over from editing), or an empty latent that feeds
    nothing, whose model (and so latent format) is unknown. Such nodes that are complete are kept,
    for the editor to show."""
    problems = problems or _Problems(importer)
    classes = _node_classes()
    types = {node.id: node.type for node in comfy_nodes}
    not_run = _not_run(comfy_nodes, classes)
    nodes: dict[str, dict[str, Any]] = {}
    for node in comfy_nodes:
        mapping = MAPPINGS.get(node.type)
        if mapping is None:
            problems.unsupported[node.type].append(node.id)
            continue
        node_class = classes[mapping.type]
        inputs: dict[str, Any] = {}
        for name, value in node.inputs.items():
            if name in mapping.ignored or name in UI_ONLY_WIDGETS or value is None:  # None: reported broken link
                continue
            if name in mapping.fixed:
                if value != mapping.fixed[name]:
                    problems.add("unsupported_value", f"{node.type} input {name!r}: only {mapping.fixed[name]!r} "
                                                      f"is supported here, got {value!r}", node.id, name)
                continue
            ours = mapping.inputs.get(name)
            if ours is None:
                problems.add("unknown_input", f"{node.type} has no input {name!r} that maps to {mapping.type}",
                             node.id, name)
                continue
            if isinstance(value, SourceRef):
                source_mapping = MAPPINGS.get(types.get(value.node, ""))
                if value.node not in types:
                    problems.add("missing_node", f"linked to node {value.node}, which is not in the workflow",
                                 node.id, name)
                elif source_mapping is not None:  # an unsupported source is listed by its type already
                    if not 0 <= value.slot < len(source_mapping.outputs):
                        problems.add("invalid_link", f"linked to output {value.slot} of node {value.node} "
                                                     f"({types[value.node]}), which has "
                                                     f"{len(source_mapping.outputs)} outputs", node.id, name)
                    else:
                        inputs[ours] = {"from": value.node, "output": source_mapping.outputs[value.slot]}
                continue
            if name in mapping.values:
                try:
                    value = mapping.values[name](value)
                except UnmappableValue as error:
                    problems.add("unsupported_value", f"{node.type} input {name!r}: {error}", node.id, name)
                    continue
            reason = _check_choice(node_class, ours, value)
            if reason is not None:
                problems.add("unsupported_value", f"{node.type} input {name!r}: {reason}", node.id, name)
                continue
            inputs[ours] = value
        entry_inputs = {**mapping.defaults, **inputs}
        implicit = {"model"} if mapping.needs_model else set()  # linked below
        if node.id in not_run and any(spec.required and name not in entry_inputs and name not in implicit
                                      for name, spec in node_class.specs().inputs.items()):
            logger.info("left out node %s (%s): it lacks a required input and no output node needs it, so "
                        "ComfyUI does not run it either", node.id, node.type)
            continue
        nodes[node.id] = {"type": mapping.type, "inputs": entry_inputs}
    for node in comfy_nodes:
        mapping = MAPPINGS.get(node.type)
        if mapping is not None and mapping.needs_model and node.id in nodes:
            model = _model_source(node.id, nodes)
            if model is None and node.id in not_run and not _linked_from(node.id, nodes):
                logger.info("left out node %s (%s): it feeds nothing, so its model is unknown, and ComfyUI "
                            "does not run it", node.id, node.type)
                del nodes[node.id]
            elif model is None and not _model_lost_to_unconverted(node.id, comfy_nodes, set(nodes)):
                problems.add("needs_model", f"{node.type} feeds no sampler and the workflow has no single "
                                            "model loader, so its model is unknown; connect it to a sampler",
                             node.id)
            else:
                nodes[node.id]["inputs"]["model"] = model
    problems.raise_any()
    document: dict[str, Any] = {"version": 1, "nodes": nodes}
    shown: dict[str, dict[str, Any]] = {}
    for node in comfy_nodes:
        if node.id not in nodes:
            continue
        if node.mode is not None:
            nodes[node.id]["mode"] = node.mode
        entry = {**({"pos": node.pos} if node.pos is not None else {}), **node.ui}
        if entry:
            shown[node.id] = entry
    if shown:
        document["ui"] = {"nodes": shown}
    return document


def node_aliases() -> dict[str, list[str]]:
    """Our node type -> the ComfyUI node types that import as it (sorted): the catalogue's `aliases`,
    by which the editor's search finds TextEncode when a ComfyUI user types CLIPTextEncode."""
    aliases: dict[str, list[str]] = {}
    for comfy_type, mapping in sorted(MAPPINGS.items()):
        aliases.setdefault(mapping.type, []).append(comfy_type)
    return aliases


class ComfyAPIImporter:
    """ComfyUI's API format: what its "Export (API)" writes and its POST /prompt takes."""

    name = API_FORMAT

    def aliases(self) -> dict[str, list[str]]:
        return node_aliases()

    def detect(self, document: Any) -> bool:
        # A request carrying anything but a UI-format workflow is this importer's to read or refuse.
        request = _request(document)
        return _api_graph(document) is not None or (request is not None and not _is_ui_document(request.workflow))

    def convert(self, document: Any) -> dict[str, Any]:
        request = _request(document)
        if request is not None and _api_graph(document) is None:
            raise WorkflowImportError(API_FORMAT, issues=[ValidationIssue(
                "invalid_request",
                f"a ComfyUI request is expected as {request.shape}, carrying a workflow in ComfyUI's API format "
                '({"<node id>": {"class_type": ..., "inputs": {...}}}) or its editor\'s UI format; '
                f"found {_found(request.workflow)} there", details={"expected": request.shape})])
        _note_images(request)
        return convert_nodes(read_api_nodes(document), API_FORMAT)


def _note_images(request: _Request | None) -> None:
    if request is not None and request.images:
        logger.warning("the request uploads %d input image(s) with its workflow; they are not imported: put "
                       "them in the inputs folder under the names its LoadImage nodes use", request.images)


class ComfyUIImporter:
    """ComfyUI's UI format: the editor's saved workflows, also embedded in its PNGs."""

    name = UI_FORMAT

    def aliases(self) -> dict[str, list[str]]:
        return node_aliases()

    def detect(self, document: Any) -> bool:
        return _is_ui_document(_carried(document))

    def convert(self, document: Any) -> dict[str, Any]:
        """Muted and bypassed nodes of types that map are kept with their mode, so that the editor
        shows them and the engine skips or passes them through. One is resolved here instead, as
        ComfyUI does when it runs (left out if muted, passed through if bypassed), when it does not
        convert cleanly or when the engine would pass a different input through than ComfyUI."""
        _note_images(_request(document))
        document = _carried(document)
        resolved: frozenset[str] = frozenset()
        while True:
            problems = _Problems(UI_FORMAT)
            comfy_nodes, expanded = _read_ui(document, problems, resolved)
            kept = {node.id for node in comfy_nodes if node.mode is not None}
            try:
                converted = convert_nodes(comfy_nodes, UI_FORMAT, problems)
            except WorkflowImportError as error:
                failed = {issue.node_id for issue in error.issues} & kept
                if not failed:
                    raise
                resolved |= failed
                continue
            disagreeing = {node.id for node in comfy_nodes if _bypass_disagrees(node, converted["nodes"])}
            if not disagreeing:
                break
            resolved |= disagreeing
        ui = converted.setdefault("ui", {})
        by_id = {str(node["id"]): node for node in expanded["nodes"]}
        crossed = [(node.id, MAPPINGS[node.type].inputs[name], ids) for node in comfy_nodes
                   if node.id in converted["nodes"] for name, ids in node.reroutes.items()
                   if name in MAPPINGS[node.type].inputs]
        for key, found in (("groups", groups(document)), ("notes", notes(expanded["nodes"])),
                           ("reroutes", reroute_points(crossed, by_id))):
            if found:
                ui[key] = found
        if not ui:
            del converted["ui"]
        return converted


def _bypass_disagrees(node: ComfyNode, converted: dict[str, dict[str, Any]]) -> bool:
    """Whether, for a kept bypassed node, our engine would pass another input to one of its used
    outputs than ComfyUI does (ComfyUI picks by its own type names and counts an input fed by a
    primitive node; the engine picks by our socket types among linked inputs)."""
    if node.mode != BYPASS or node.id not in converted:
        return False
    mapping = MAPPINGS[node.type]
    entry = NodeEntry.model_validate(converted[node.id])
    node_class = _node_classes()[mapping.type]
    for slot, theirs in node.feeds.items():
        if not 0 <= slot < len(mapping.outputs):
            continue  # a link to an output the node lacks: reported at its consumer
        ours = bypass_feed(entry, node_class, mapping.outputs[slot])
        if ours != (mapping.inputs.get(theirs) if theirs is not None else None):
            return True
    return False


IMPORTERS = [ComfyAPIImporter(), ComfyUIImporter()]


# --- documentation ------------------------------------------------------------------------------

def _code(value: Any) -> str:
    return f"`{value}`" if isinstance(value, str) else f"`{value!r}`"


MAX_CHOICES_SHOWN = 10  # longer lists (samplers, schedulers) are in `nodegraph nodes`


def mapping_notes(comfy_type: str, mapping: NodeMapping) -> list[str]:
    """What a user of ComfyUI's node should know about its import: renamed inputs, refused values,
    inputs without effect here, what our node adds."""
    notes = []
    renamed = [f"{_code(theirs)} → {_code(ours)}" for theirs, ours in mapping.inputs.items() if theirs != ours]
    if renamed:
        notes.append("inputs " + ", ".join(renamed))
    specs = _node_classes()[mapping.type].specs().inputs
    for theirs, ours in mapping.inputs.items():
        choices = specs[ours].choices if ours in specs else None
        if choices is not None and len(choices) <= MAX_CHOICES_SHOWN:
            notes.append(f"{_code(theirs)}: one of " + ", ".join(map(_code, choices)))
    if mapping.values:
        notes.append(", ".join(map(_code, mapping.values)) + " values translated (one without an equivalent is refused)")
    notes += [f"{_code(name)}: only {_code(value)}, other values refused" for name, value in mapping.fixed.items()]
    if mapping.ignored:
        notes.append(", ".join(map(_code, sorted(mapping.ignored))) + " ignored (no effect on the models run here)")
    if mapping.defaults:
        notes.append("sets " + ", ".join(f"{_code(k)}={_code(v)}" for k, v in mapping.defaults.items()))
    if mapping.needs_model:
        notes.append("its model is the one of the sampler it feeds")
    if mapping.later_widgets:
        notes.append(f"files from older ComfyUI without its last {mapping.later_widgets} widget(s) accepted")
    return notes


def mapping_markdown() -> str:
    """The Markdown table of MAPPINGS, one row per ComfyUI node type: the node it becomes and notes
    (README's ComfyUI section is generated from it; tests/diffusion/test_comfyui_readme.py keeps it so)."""
    lines = ["| ComfyUI node | nodegraph node | notes |", "| --- | --- | --- |"]
    for comfy_type in sorted(MAPPINGS, key=str.lower):
        mapping = MAPPINGS[comfy_type]
        notes = "; ".join(mapping_notes(comfy_type, mapping))
        lines.append(f"| `{comfy_type}` | `{mapping.type}` | {notes} |")
    return "\n".join(lines)

