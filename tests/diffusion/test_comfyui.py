"""ComfyUI import: the API and UI formats of ComfyUI's core nodes become workflows of the diffusion
pack's nodes; the default text-to-image graph runs unchanged; what cannot be mapped is named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pydantic
import pytest

from nodegraph.importers import UNSUPPORTED_NODE_TYPES, WorkflowImportError
from nodegraph_diffusion.nodes import NODES, comfyui

DATA = Path(__file__).with_name("data")
API, UI = comfyui.IMPORTERS


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.fixture
def api_graph() -> dict:
    return load("comfyui_txt2img_api.json")


@pytest.fixture
def ui_graph() -> dict:
    return load("comfyui_txt2img_ui.json")


def link(node: str, output: str) -> dict:
    return {"from": node, "output": output}


def import_error(importer, document) -> WorkflowImportError:
    with pytest.raises(WorkflowImportError) as caught:
        importer.convert(document)
    return caught.value


def issues_at(error: WorkflowImportError) -> dict[tuple[str | None, str | None], str]:
    return {(issue.node_id, issue.input): issue.code for issue in error.issues if issue.code != UNSUPPORTED_NODE_TYPES}


def test_default_api_graph_becomes_our_txt2img_graph(api_graph):
    nodes = API.convert(api_graph)["nodes"]
    assert {node_id: node["type"] for node_id, node in nodes.items()} == {
        "3": "KSampler", "4": "LoadCheckpoint", "5": "EmptyLatent", "6": "TextEncode", "7": "TextEncode",
        "8": "VAEDecode", "9": "SaveImage"}
    assert nodes["3"]["inputs"] == {
        "seed": 8566257, "steps": 2, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
        "model": link("4", "model"), "positive": link("6", "conditioning"), "negative": link("7", "conditioning"),
        "latent": link("5", "latent")}
    assert nodes["4"]["inputs"] == {"name": "tiny-sd1.safetensors"}
    # ComfyUI's empty latent has no model input; ours is linked to the loader of the sampler it feeds.
    assert nodes["5"]["inputs"] == {"width": 32, "height": 32, "batch_size": 1, "model": link("4", "model")}
    assert nodes["6"]["inputs"] == {"clip": link("4", "clip"), "text": "a red circle on a blue background"}
    assert nodes["8"]["inputs"] == {"latent": link("3", "latent"), "vae": link("4", "vae")}
    assert nodes["9"]["inputs"] == {"images": link("8", "image"), "filename_prefix": "ComfyUI"}


def test_ui_format_converts_to_the_same_graph_with_positions(api_graph, ui_graph):
    converted = UI.convert(ui_graph)
    assert converted["nodes"] == API.convert(api_graph)["nodes"]
    assert converted["ui"]["nodes"]["3"] == {"pos": [863.0, 186.0]}
    assert set(converted["ui"]["nodes"]) == set(converted["nodes"])


def test_each_importer_detects_only_its_format(api_graph, ui_graph):
    assert API.detect(api_graph) and not API.detect(ui_graph)
    assert UI.detect(ui_graph) and not UI.detect(api_graph)
    assert API.detect({"prompt": api_graph, "client_id": "x"})  # the body of ComfyUI's POST /prompt
    native = {"version": 1, "nodes": {"a": {"type": "TextEncode", "inputs": {}}}}
    assert not API.detect(native) and not UI.detect(native)
    assert not API.detect({}) and not API.detect([])


def test_unsupported_types_and_values_are_all_named(api_graph):
    api_graph["3"]["inputs"] |= {"sampler_name": "euler_dy", "scheduler": "AYS SDXL"}  # custom nodes' names
    api_graph["10"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x.pth"}}
    api_graph["11"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["10", 0],
                                                                         "image": ["8", 0]}}
    api_graph["12"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["10", 0],
                                                                         "image": ["8", 0]}}
    api_graph["9"]["inputs"]["images"] = ["11", 0]  # fed by an unsupported node: listed once, by its type
    api_graph["8"]["inputs"]["tiling"] = True
    error = import_error(API, api_graph)
    assert error.unsupported_types == {"ImageUpscaleWithModel": ["11", "12"], "UpscaleModelLoader": ["10"]}
    assert "ImageUpscaleWithModel (nodes 11, 12), UpscaleModelLoader (node 10)" in error.issues[0].message
    assert issues_at(error) == {("3", "sampler_name"): "unsupported_value", ("3", "scheduler"): "unsupported_value",
                                ("8", "tiling"): "unknown_input"}
    sampler_issue = next(i for i in error.issues if i.input == "sampler_name")
    assert "'euler_dy' is not supported here" in sampler_issue.message
    assert "dpmpp_2m_sde," in sampler_issue.message  # the supported names are listed


def test_broken_links_name_node_and_input(api_graph):
    api_graph["3"]["inputs"]["positive"] = ["99", 0]
    api_graph["8"]["inputs"]["vae"] = ["4", 3]
    error = import_error(API, api_graph)
    assert issues_at(error) == {("3", "positive"): "missing_node", ("8", "vae"): "invalid_link"}
    assert error.unsupported_types == {}
    api_graph["9"]["inputs"] = ["ComfyUI"]
    assert issues_at(import_error(API, api_graph)) == {("9", None): "invalid_document"}


def test_advanced_sampler_clip_skip_and_lora_values(api_graph):
    api_graph["10"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors", "strength_model": 0.8,
        "strength_clip": 0.5}}
    api_graph["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": -2}}
    api_graph["6"]["inputs"]["clip"] = ["11", 0]
    api_graph["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "enable", "noise_seed": 5, "steps": 4, "cfg": 6.5, "sampler_name": "dpmpp_2m",
        "scheduler": "karras", "start_at_step": 1, "end_at_step": 3, "return_with_leftover_noise": "disable",
        "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}
    nodes = API.convert(api_graph)["nodes"]
    assert nodes["10"] == {"type": "LoadLora", "inputs": {
        "model": link("4", "model"), "clip": link("4", "clip"), "name": "style.safetensors",
        "strength_model": 0.8, "strength_clip": 0.5}}
    assert nodes["11"] == {"type": "SetClipSkip", "inputs": {"clip": link("10", "clip"), "clip_skip": 2}}
    assert nodes["3"]["type"] == "KSamplerAdvanced"
    assert nodes["3"]["inputs"] == {
        "add_noise": True, "seed": 5, "steps": 4, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
        "start_at_step": 1, "end_at_step": 3, "return_with_leftover_noise": False, "model": link("10", "model"),
        "positive": link("6", "conditioning"), "negative": link("7", "conditioning"), "latent": link("5", "latent")}
    # The latent's model is traced through the LoRA to the checkpoint loader.
    assert nodes["5"]["inputs"]["model"] == link("4", "model")

    api_graph["11"]["inputs"]["stop_at_clip_layer"] = 1
    api_graph["3"]["inputs"]["add_noise"] = "yes"
    error = import_error(API, api_graph)
    assert issues_at(error) == {("11", "stop_at_clip_layer"): "unsupported_value",
                                ("3", "add_noise"): "unsupported_value"}
    assert "from -1 (the last) to -24" in str(error)


def test_inpaint_controlnet_and_latent_nodes_map():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}},
        "3": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["2", 0], "vae": ["1", 2], "mask": ["2", 1],
                                                              "grow_mask_by": 8}},
        "4": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "6": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["5", 0], "width": 64, "height": 32,
                                                              "x": 8, "y": 16, "strength": 0.5}},
        "7": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["6", 0]}},
        "8": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["7", 0], "negative": ["5", 0], "control_net": ["4", 0], "image": ["2", 0],
            "strength": 0.7, "start_percent": 0.1, "end_percent": 0.9, "vae": ["1", 2]}},
        "9": {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0], "upscale_method": "bilinear",
                                                        "width": 96, "height": 64, "crop": "center"}},
        "10": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["9", 0], "mask": ["2", 1]}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["8", 0], "negative": ["8", 1], "latent_image": ["10", 0], "seed": 1,
            "steps": 3, "cfg": 5.0, "sampler_name": "uni_pc", "scheduler": "beta", "denoise": 0.6}},
    }
    nodes = API.convert(graph)["nodes"]
    assert nodes["2"] == {"type": "LoadImage", "inputs": {"image": "photo.png"}}
    assert nodes["3"]["inputs"] == {"image": link("2", "image"), "vae": link("1", "vae"), "mask": link("2", "mask"),
                                    "grow_mask_by": 8}
    assert nodes["6"]["inputs"] == {"conditioning": link("5", "conditioning"), "width": 64, "height": 32, "x": 8,
                                    "y": 16, "strength": 0.5}
    assert nodes["7"]["inputs"] == {"a": link("5", "conditioning"), "b": link("6", "conditioning")}
    assert nodes["8"] == {"type": "ApplyControlNet", "inputs": {
        "positive": link("7", "conditioning"), "negative": link("5", "conditioning"),
        "control_net": link("4", "control_net"), "image": link("2", "image"), "strength": 0.7, "start": 0.1,
        "end": 0.9, "vae": link("1", "vae")}}
    assert nodes["9"]["inputs"] == {"latent": link("3", "latent"), "method": "bilinear", "width": 96, "height": 64,
                                    "crop": "center"}
    assert nodes["11"]["inputs"]["negative"] == link("8", "negative")

    graph["9"]["inputs"]["upscale_method"] = "bislerp"
    assert API.convert(graph)["nodes"]["9"]["inputs"]["method"] == "bislerp"
    graph["9"]["inputs"]["upscale_method"] = "lanczos"  # ComfyUI's image nodes have it, its latent nodes not
    assert issues_at(import_error(API, graph)) == {("9", "upscale_method"): "unsupported_value"}


def test_custom_sampler_stages_map(api_graph):
    del api_graph["3"]
    api_graph |= {
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7, "control_after_generate": "fixed"}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 6,
                                                          "denoise": 1.0}},
        "13": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["12", 0], "step": 2}},
        "14": {"class_type": "CFGGuider", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "cfg": 4.5}},
        "15": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["14", 0],
                                                                 "sampler": ["11", 0], "sigmas": ["13", 1],
                                                                 "latent_image": ["5", 0]}},
        "16": {"class_type": "DisableNoise", "inputs": {}},
    }
    api_graph["8"]["inputs"]["samples"] = ["15", 1]
    nodes = API.convert(api_graph)["nodes"]
    assert nodes["10"] == {"type": "RandomNoise", "inputs": {"seed": 7}}
    assert nodes["12"]["inputs"] == {"model": link("4", "model"), "scheduler": "karras", "steps": 6, "denoise": 1.0}
    assert nodes["14"]["type"] == "Guider" and nodes["14"]["inputs"]["cfg"] == 4.5
    assert nodes["15"] == {"type": "Sample", "inputs": {
        "noise": link("10", "noise"), "guider": link("14", "guider"), "sampler": link("11", "sampler"),
        "sigmas": link("13", "low"), "latent": link("5", "latent")}}
    assert nodes["8"]["inputs"]["latent"] == link("15", "denoised")
    assert nodes["5"]["inputs"]["model"] == link("4", "model")
    assert nodes["16"] == {"type": "DisableNoise", "inputs": {}}


# As ComfyUI declares them (nodes.py, comfy_extras/nodes_custom_sampler.py, nodes_model_advanced.py).
CORE_SAMPLING_INPUTS: dict[str, dict[str, dict]] = {
    "ControlNetApply": {"conditioning": {"link": True}, "control_net": {"link": True}, "image": {"link": True},
                        "strength": {"default": 1.0, "min": 0.0, "max": 10.0}},
    "ModelSamplingDiscrete": {"model": {"link": True},
                              "sampling": {"choices": ["eps", "v_prediction", "lcm", "x0", "img_to_img"]},
                              "zsnr": {"boolean": False}},
    "SDTurboScheduler": {"model": {"link": True}, "steps": {"default": 1, "min": 1, "max": 10},
                         "denoise": {"default": 1.0, "min": 0.0, "max": 1.0}},
    "SamplerCustom": {"model": {"link": True}, "add_noise": {"boolean": True},
                      "noise_seed": {"default": 0, "min": 0, "max": 0xffffffffffffffff},
                      "cfg": {"default": 8.0, "min": 0.0, "max": 100.0}, "positive": {"link": True},
                      "negative": {"link": True}, "sampler": {"link": True}, "sigmas": {"link": True},
                      "latent_image": {"link": True}},
    "CLIPVisionLoader": {"clip_name": {"files": "clip_vision"}},
    "unCLIPCheckpointLoader": {"ckpt_name": {"files": "checkpoints"}},
    "CLIPVisionEncode": {"clip_vision": {"link": True}, "image": {"link": True}, "crop": {"choices": ["center", "none"]}},
    "unCLIPConditioning": {"conditioning": {"link": True}, "clip_vision_output": {"link": True},
                           "strength": {"default": 1.0, "min": -10.0, "max": 10.0},
                           "noise_augmentation": {"default": 0.0, "min": 0.0, "max": 1.0}},
}


def test_core_sampling_nodes_take_comfyuis_inputs_names_defaults_and_choices():
    # Seeds go up to 2^63 - 1 here, as KSampler's (ComfyUI: 2^64 - 1); Lotus' img_to_img is not supported.
    check_comfyui_inputs(CORE_SAMPLING_INPUTS, set(), {("SamplerCustom", "noise_seed"): 0xffffffffffffffff})


def test_sampler_custom_turbo_scheduler_model_sampling_and_old_controlnet_map():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "2": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "4": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "scribble.safetensors"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "hint.png", "upload": "image"}},
        "6": {"class_type": "ControlNetApply", "inputs": {"conditioning": ["3", 0], "control_net": ["4", 0],
                                                          "image": ["5", 0], "strength": 0.9}},
        "7": {"class_type": "SDTurboScheduler", "inputs": {"model": ["2", 0], "steps": 2, "denoise": 0.5}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "10": {"class_type": "SamplerCustom", "inputs": {
            "add_noise": False, "noise_seed": 5, "cfg": 1, "model": ["2", 0], "positive": ["6", 0],
            "negative": ["3", 0], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 1], "vae": ["1", 2]}},
    }
    nodes = API.convert(graph)["nodes"]
    assert nodes["2"] == {"type": "ModelSamplingDiscrete", "inputs": {"model": link("1", "model"), "sampling": "lcm",
                                                                      "zsnr": True}}
    assert nodes["6"] == {"type": "ApplyControlNetSimple", "inputs": {
        "conditioning": link("3", "conditioning"), "control_net": link("4", "control_net"),
        "image": link("5", "image"), "strength": 0.9}}
    assert nodes["7"] == {"type": "SDTurboScheduler", "inputs": {"model": link("2", "model"), "steps": 2,
                                                                 "denoise": 0.5}}
    assert nodes["10"] == {"type": "SamplerCustom", "inputs": {
        "add_noise": False, "noise_seed": 5, "cfg": 1, "model": link("2", "model"),
        "positive": link("6", "conditioning"), "negative": link("3", "conditioning"),
        "sampler": link("8", "sampler"), "sigmas": link("7", "sigmas"), "latent": link("9", "latent")}}
    assert nodes["11"]["inputs"]["latent"] == link("10", "denoised")
    # The empty latent feeds SamplerCustom only: its model is traced through ModelSamplingDiscrete.
    assert nodes["9"]["inputs"]["model"] == link("1", "model")

    graph["2"]["inputs"]["sampling"] = "img_to_img"  # Lotus' image-to-image prediction: not here
    error = import_error(API, graph)
    assert issues_at(error) == {("2", "sampling"): "unsupported_value"}
    assert "supported: eps, v_prediction, lcm, x0" in str(error)

    document = {"nodes": [
        ui_widget_node(1, "CheckpointLoaderSimple", ["sd_xl_turbo_1.0_fp16.safetensors"]),
        ui_widget_node(2, "ModelSamplingDiscrete", ["v_prediction", False], {"model": 1}),
        ui_widget_node(3, "SDTurboScheduler", [1, 1], {"model": 2}),
        ui_widget_node(4, "SamplerCustom", [True, 0, "fixed", 1],
                       {"model": 3, "positive": 4, "negative": 5, "sampler": 6, "sigmas": 7, "latent_image": 8}),
        ui_widget_node(5, "CLIPTextEncode", ["a fox"], {"clip": 9}),
        ui_widget_node(6, "KSamplerSelect", ["euler_ancestral"]),
        ui_widget_node(7, "EmptyLatentImage", [512, 512, 1]),
        ui_widget_node(8, "ControlNetLoader", ["scribble.safetensors"]),
        ui_widget_node(9, "LoadImage", ["hint.png", "image"]),
        ui_widget_node(10, "ControlNetApply", [0.8999999999999999],
                       {"conditioning": 10, "control_net": 11, "image": 12}),
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 2, 0, 4, 0, "MODEL"],
                 [4, 10, 0, 4, 1, "CONDITIONING"], [5, 5, 0, 4, 2, "CONDITIONING"], [6, 6, 0, 4, 3, "SAMPLER"],
                 [7, 3, 0, 4, 4, "SIGMAS"], [8, 7, 0, 4, 5, "LATENT"], [9, 1, 1, 5, 0, "CLIP"],
                 [10, 5, 0, 10, 0, "CONDITIONING"], [11, 8, 0, 10, 1, "CONTROL_NET"], [12, 9, 0, 10, 2, "IMAGE"]]}
    nodes = UI.convert(document)["nodes"]
    assert nodes["2"]["inputs"] == {"sampling": "v_prediction", "zsnr": False, "model": link("1", "model")}
    assert nodes["3"]["inputs"] == {"steps": 1, "denoise": 1, "model": link("2", "model")}
    assert nodes["4"]["inputs"] == {
        "add_noise": True, "noise_seed": 0, "cfg": 1, "model": link("2", "model"),
        "positive": link("10", "conditioning"), "negative": link("5", "conditioning"),
        "sampler": link("6", "sampler"), "sigmas": link("3", "sigmas"), "latent": link("7", "latent")}
    assert nodes["10"]["inputs"] == {"strength": 0.8999999999999999, "conditioning": link("5", "conditioning"),
                                     "control_net": link("8", "control_net"), "image": link("9", "image")}


def test_clip_vision_and_unclip_conditioning_map_from_each_comfyui_version():
    graph = {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_g.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "sunset.png"}},
        "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 0], "image": ["2", 0], "crop": "none"}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "6": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["5", 0], "clip_vision_output": ["3", 0],
                                                             "strength": 0.75, "noise_augmentation": 0.1}},
    }
    graph["7"] = {"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": "sd21-unclip-h.ckpt"}}
    graph["8"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["7", 3], "image": ["2", 0]}}
    nodes = API.convert(graph)["nodes"]
    assert nodes["7"] == {"type": "LoadUnclipCheckpoint", "inputs": {"name": "sd21-unclip-h.ckpt"}}
    assert nodes["8"]["inputs"]["clip_vision"] == link("7", "clip_vision")
    # An empty latent feeding no sampler takes a workflow's only model loader, unCLIP's too.
    alone = {key: graph[key] for key in ("2", "7", "8")}
    alone["9"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 768, "batch_size": 1}}
    assert API.convert(alone)["nodes"]["9"]["inputs"]["model"] == link("7", "model")
    assert nodes["1"] == {"type": "LoadCLIPVision", "inputs": {"name": "clip_vision_g.safetensors"}}
    assert nodes["3"] == {"type": "CLIPVisionEncode", "inputs": {"clip_vision": link("1", "clip_vision"),
                                                                 "image": link("2", "image"), "crop": "none"}}
    assert nodes["6"] == {"type": "UnclipConditioning", "inputs": {
        "conditioning": link("5", "conditioning"), "clip_vision_output": link("3", "clip_vision_output"),
        "strength": 0.75, "noise_augmentation": 0.1}}

    document = {"nodes": [
        ui_widget_node(1, "CLIPVisionLoader", ["clip_vision_g.safetensors"]),
        ui_widget_node(2, "LoadImage", ["sunset.png", "image"]),
        ui_widget_node(3, "CLIPVisionEncode", [], {"clip_vision": 1, "image": 2}),  # before the crop widget
        ui_widget_node(4, "CLIPVisionEncode", ["center"], {"clip_vision": 3, "image": 4}),
        ui_widget_node(5, "unCLIPConditioning", [0.75, 0], {"clip_vision_output": 5}),
    ], "links": [[1, 1, 0, 3, 0, "CLIP_VISION"], [2, 2, 0, 3, 1, "IMAGE"], [3, 1, 0, 4, 0, "CLIP_VISION"],
                 [4, 2, 0, 4, 1, "IMAGE"], [5, 3, 0, 5, 1, "CLIP_VISION_OUTPUT"]]}
    nodes = UI.convert(document)["nodes"]
    assert nodes["3"]["inputs"] == {"clip_vision": link("1", "clip_vision"), "image": link("2", "image")}
    assert nodes["4"]["inputs"]["crop"] == "center"
    assert nodes["5"]["inputs"] == {"strength": 0.75, "noise_augmentation": 0,
                                    "clip_vision_output": link("3", "clip_vision_output")}


def test_image_nodes_map():
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red", "upload": "image"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 64, "height": 0, "crop": "disabled"}},
        "4": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["3", 0], "left": 8, "top": 0, "right": 16,
                                                              "bottom": 0, "feathering": 4}},
        "5": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["4", 0], "source": ["1", 0], "x": 4,
                                                               "y": 2, "resize_source": False, "mask": ["2", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    nodes = API.convert(graph)["nodes"]
    assert nodes["2"] == {"type": "LoadMask", "inputs": {"image": "mask.png", "channel": "red"}}
    assert nodes["3"]["inputs"] == {"image": link("1", "image"), "method": "nearest", "width": 64, "height": 0,
                                    "crop": "disabled"}
    assert nodes["5"] == {"type": "ImageCompositeMasked", "inputs": {
        "destination": link("4", "image"), "source": link("1", "image"), "x": 4, "y": 2, "mask": link("2", "mask")}}
    assert nodes["6"] == {"type": "PreviewImage", "inputs": {"images": link("5", "image")}}

    graph["5"]["inputs"]["resize_source"] = True
    graph["3"]["inputs"]["upscale_method"] = "bislerp"
    assert issues_at(import_error(API, graph)) == {("5", "resize_source"): "unsupported_value",
                                                   ("3", "upscale_method"): "unsupported_value"}


def test_sdxl_text_model_only_lora_and_tiled_vae_nodes_map():
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "xl.safetensors"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "style.safetensors",
                                                              "strength_model": 0.6}},
        "3": {"class_type": "CLIPTextEncodeSDXL", "inputs": {
            "clip": ["1", 1], "width": 2048, "height": 1536, "crop_w": 16, "crop_h": 8, "target_width": 1024,
            "target_height": 768, "text_g": "a castle", "text_l": "oil painting"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "5": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["4", 0], "vae": ["1", 2], "tile_size": 512,
                                                         "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "seed": 1,
            "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5}},
        "7": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["6", 0], "vae": ["1", 2], "tile_size": 256,
                                                         "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}},
    }
    nodes = API.convert(graph)["nodes"]
    assert nodes["2"] == {"type": "LoadLora", "inputs": {"model": link("1", "model"), "name": "style.safetensors",
                                                         "strength_model": 0.6}}
    assert nodes["3"] == {"type": "TextEncodeSDXL", "inputs": {
        "clip": link("1", "clip"), "width": 2048, "height": 1536, "crop_left": 16, "crop_top": 8,
        "target_width": 1024, "target_height": 768, "text_g": "a castle", "text_l": "oil painting"}}
    assert nodes["5"] == {"type": "VAEEncodeTiled", "inputs": {"image": link("4", "image"), "vae": link("1", "vae"),
                                                               "tile_size": 512, "overlap": 64}}
    assert nodes["6"]["inputs"]["model"] == link("2", "model")
    assert nodes["7"] == {"type": "VAEDecodeTiled", "inputs": {"latent": link("6", "latent"), "vae": link("1", "vae"),
                                                               "tile_size": 256, "overlap": 32}}


@pytest.mark.parametrize("values, expected", [
    ([256, 32, 64, 8], {"tile_size": 256, "overlap": 32}),  # current ComfyUI
    ([256, 32], {"tile_size": 256, "overlap": 32}),  # before the temporal tiles
    ([256], {"tile_size": 256}),  # before the overlap
])
def test_ui_tiled_decode_from_each_comfyui_version(ui_graph, values, expected):
    graph = copy.deepcopy(ui_graph)
    decode = ui_node(graph, 8)
    decode["type"], decode["widgets_values"] = "VAEDecodeTiled", values
    inputs = UI.convert(graph)["nodes"]["8"]["inputs"]
    assert {key: inputs[key] for key in ("tile_size", "overlap") if key in inputs} == expected


def test_ui_tiled_decode_with_too_many_widgets_is_named(ui_graph):
    graph = copy.deepcopy(ui_graph)
    decode = ui_node(graph, 8)
    decode["type"], decode["widgets_values"] = "VAEDecodeTiled", [256, 32, 64, 8, 1]
    error = import_error(UI, graph)
    assert issues_at(error) == {("8", None): "invalid_widgets"}
    assert "tile_size, overlap, temporal_size, temporal_overlap" in str(error)


def test_empty_latent_feeding_no_sampler_takes_the_only_loader_or_is_named(api_graph):
    api_graph["3"]["inputs"]["latent_image"] = ["12", 0]
    api_graph["12"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}
    nodes = API.convert(api_graph)["nodes"]
    assert nodes["12"]["inputs"]["model"] == link("4", "model")
    assert nodes["5"]["inputs"]["model"] == link("4", "model")  # feeds nothing now; there is one loader
    api_graph["13"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}}
    # With two loaders: one that feeds nothing is left out, as ComfyUI never runs it ...
    assert "5" not in API.convert(copy.deepcopy(api_graph))["nodes"]
    # ... but one that an output needs without a sampler between them is named.
    api_graph["14"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}}
    api_graph["15"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "raw"}}
    error = import_error(API, api_graph)
    assert issues_at(error) == {("5", None): "needs_model"}


def ui_node(graph: dict, node_id: int) -> dict:
    return next(node for node in graph["nodes"] if node["id"] == node_id)


def test_ui_primitive_reroute_bypass_mute_and_notes(api_graph, ui_graph):
    graph = copy.deepcopy(ui_graph)
    # The seed widget turned into an input fed by a primitive node.
    sampler = ui_node(graph, 3)
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": 10, "widget": {"name": "seed"}})
    graph["nodes"].append({"id": 20, "type": "PrimitiveNode", "pos": [0, 0], "mode": 0,
                           "outputs": [{"name": "INT", "type": "INT", "links": [10], "widget": {"name": "seed"}}],
                           "widgets_values": [42, "fixed"]})
    graph["links"].append([10, 20, 0, 3, 4, "INT"])
    # The model reaches the sampler through a reroute and a bypassed LoRA loader.
    graph["nodes"].append({"id": 21, "type": "Reroute", "pos": [0, 0], "mode": 0,
                           "inputs": [{"name": "", "type": "*", "link": 11}],
                           "outputs": [{"name": "", "type": "MODEL", "links": [12]}]})
    graph["nodes"].append({"id": 22, "type": "LoraLoader", "pos": [0, 0], "mode": 4,
                           "inputs": [{"name": "model", "type": "MODEL", "link": 12},
                                      {"name": "clip", "type": "CLIP", "link": None}],
                           "widgets_values": ["style.safetensors", 1, 1]})
    graph["links"] = [entry for entry in graph["links"] if entry[0] != 1]
    graph["links"] += [[11, 4, 0, 21, 0, "MODEL"], [12, 21, 0, 22, 0, "MODEL"], [1, 22, 0, 3, 0, "MODEL"]]
    # A muted branch and a note change nothing that runs.
    graph["nodes"].append({"id": 23, "type": "SaveImage", "mode": 2, "inputs": [{"name": "images", "link": 13}],
                           "widgets_values": ["muted"]})
    graph["links"].append([13, 8, 0, 23, 0, "IMAGE"])
    graph["nodes"].append({"id": 24, "type": "Note", "mode": 0, "widgets_values": ["remember the milk"]})

    converted = UI.convert(graph)
    expected = API.convert(api_graph)["nodes"]
    expected["3"]["inputs"]["seed"] = 42
    # The bypassed and muted nodes stay, with their modes (the engine passes the LoRA loader's model
    # through and skips the muted save: tests/diffusion/test_comfyui_ui_block.py); the reroute and
    # the note go to the ui block.
    lora, muted = converted["nodes"].pop("22"), converted["nodes"].pop("23")
    assert lora["mode"] == "bypass" and lora["inputs"]["model"] == link("4", "model")
    assert muted == {"type": "SaveImage", "inputs": {"filename_prefix": "muted", "images": link("8", "image")},
                     "mode": "mute"}
    assert converted["nodes"]["3"]["inputs"].pop("model") == link("22", "model")
    expected["3"]["inputs"].pop("model")
    assert converted["nodes"] == expected
    assert [point["to"] for point in converted["ui"]["reroutes"]] == [{"node": "22", "input": "model"}]
    assert [note["text"] for note in converted["ui"]["notes"]] == ["remember the milk"]


def test_ui_problems_are_named(ui_graph):
    graph = copy.deepcopy(ui_graph)
    ui_node(graph, 5)["widgets_values"] = [32, 32]
    ui_node(graph, 8)["inputs"][1]["link"] = 77
    graph["nodes"].append({"id": 30, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "link": 31}],
                           "widgets_values": ["x"]})
    graph["nodes"].append({"id": 31, "type": "VAEDecode", "mode": 2, "inputs": []})
    graph["links"].append([31, 31, 0, 30, 0, "IMAGE"])
    graph["nodes"].append({"id": 32, "type": "CR Prompt Text", "mode": 0, "widgets_values": ["x"]})
    graph["nodes"].append({"id": 33, "type": "6f1d2c3e-0000-4000-8000-000000000001", "mode": 0})
    graph["definitions"] = {"subgraphs": [{"id": "6f1d2c3e-0000-4000-8000-000000000001", "name": "Upscale"}]}
    error = import_error(UI, graph)
    assert error.unsupported_types == {"CR Prompt Text": ["32"]}
    # A subgraph instance is expanded into its nodes; this definition has none to expand. The muted
    # VAEDecode is kept as a muted node: validation, not the import, names what it feeds.
    assert issues_at(error) == {("5", None): "invalid_widgets", ("8", "vae"): "invalid_link",
                                ("33", None): "invalid_subgraph"}
    assert "width, height, batch_size" in str(error)


def test_every_mapping_matches_the_pack_nodes():
    classes = {node_class.type_name: node_class for node_class in NODES}
    for comfy_type, mapping in comfyui.MAPPINGS.items():
        assert mapping.type in classes, comfy_type
        specs = classes[mapping.type].specs()
        assert set(mapping.inputs.values()) <= set(specs.inputs), comfy_type
        assert set(mapping.outputs) <= set(specs.outputs) and len(set(mapping.outputs)) == len(mapping.outputs)
        if mapping.needs_model:
            assert "model" in specs.inputs and "model" not in mapping.inputs.values()
        assert set(mapping.widgets) <= (set(mapping.inputs) | set(mapping.fixed) | mapping.ignored
                                        | comfyui.UI_ONLY_WIDGETS), comfy_type


def test_convert_command_writes_the_ui_graph_in_our_format(tmp_path, capsys, api_graph):
    from nodegraph.cli import main

    out = tmp_path / "txt2img.json"
    assert main(["convert", str(DATA / "comfyui_txt2img_ui.json"), str(out)]) == 0
    assert comfyui.UI_FORMAT in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["version"] == 1 and written["nodes"] == API.convert(api_graph)["nodes"]
    assert written["ui"]["nodes"]["4"] == {"pos": [26.0, 474.0]}


@pytest.mark.slow
def test_default_api_graph_runs_unchanged_from_the_command_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from _checkpoint_fixtures import write_safetensors
    from _pipeline_fixtures import sd1_weights
    from nodegraph.cli import main

    # Only the SD1 checkpoint of the pipeline fixtures' models folder: the graph loads nothing else.
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_safetensors(checkpoints / "tiny-sd1.safetensors", sd1_weights(), dtype=None)
    monkeypatch.setenv("NODEGRAPH_MODELS", str(tmp_path / "models"))
    code = main(["run", str(DATA / "comfyui_txt2img_api.json"), "--output-dir", str(tmp_path / "out"),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    files = [Path(line) for line in out.splitlines()]
    assert [path.suffix for path in files] == [".png"]
    assert files[0].name.startswith("ComfyUI")
    with Image.open(files[0]) as image:
        assert image.size == (32, 32)


# --- SD3 / Flux nodes ---------------------------------------------------------------------------

LINK = {"link": True}
STRING = {"string": ""}  # a text input, with its default
# The inputs of ComfyUI's SD3/Flux nodes as its node definitions declare them (nodes.py,
# comfy_extras/nodes_sd3.py, nodes_flux.py, nodes_model_advanced.py, nodes_custom_sampler.py):
# choices in ComfyUI's order (the first is the default), numeric defaults and ranges, file folders.
COMFYUI_INPUTS: dict[str, dict[str, dict]] = {
    "UNETLoader": {"unet_name": {"files": "diffusion_models"},
                   "weight_dtype": {"choices": ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]}},
    "CLIPLoader": {"clip_name": {"files": "text_encoders"},
                   "type": {"choices": ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv",
                                        "pixart", "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2",
                                        "qwen_image", "hunyuan_image", "flux2", "ovis"]},
                   "device": {"choices": ["default", "cpu"]}},
    "DualCLIPLoader": {"clip_name1": {"files": "text_encoders"}, "clip_name2": {"files": "text_encoders"},
                       "type": {"choices": ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image",
                                            "hunyuan_video_15", "kandinsky5", "kandinsky5_image", "newbie"]},
                       "device": {"choices": ["default", "cpu"]}},
    "TripleCLIPLoader": {"clip_name1": {"files": "text_encoders"}, "clip_name2": {"files": "text_encoders"},
                         "clip_name3": {"files": "text_encoders"}},
    "CLIPTextEncodeSD3": {"clip": LINK, "clip_l": STRING, "clip_g": STRING, "t5xxl": STRING,
                          "empty_padding": {"choices": ["none", "empty_prompt"]}},
    "CLIPTextEncodeFlux": {"clip": LINK, "clip_l": STRING, "t5xxl": STRING,
                           "guidance": {"default": 3.5, "min": 0.0, "max": 100.0}},
    "FluxGuidance": {"conditioning": LINK, "guidance": {"default": 3.5, "min": 0.0, "max": 100.0}},
    "ModelSamplingSD3": {"model": LINK, "shift": {"default": 3.0, "min": 0.0, "max": 100.0}},
    "ModelSamplingFlux": {"model": LINK, "max_shift": {"default": 1.15, "min": 0.0, "max": 100.0},
                          "base_shift": {"default": 0.5, "min": 0.0, "max": 100.0},
                          "width": {"default": 1024, "min": 16, "max": 16384, "step": 8},
                          "height": {"default": 1024, "min": 16, "max": 16384, "step": 8}},
    "EmptySD3LatentImage": {"width": {"default": 1024, "min": 16, "max": 16384, "step": 16},
                            "height": {"default": 1024, "min": 16, "max": 16384, "step": 16},
                            "batch_size": {"default": 1, "min": 1, "max": 4096}},
    "BasicGuider": {"model": LINK, "conditioning": LINK},
}
# Where ours knowingly differ: EmptyLatent serves every family, so its default size is SD1's (an
# imported graph always carries the size); a shift of 0 would put every noise level at 0.
DEFAULT_DIFFERS = {("EmptySD3LatentImage", "width"), ("EmptySD3LatentImage", "height")}
VALUE_REFUSED = {("ModelSamplingSD3", "shift"): 0.0}


def check_comfyui_inputs(documented_inputs: dict[str, dict[str, dict]], default_differs: set[tuple[str, str]],
                         value_refused: dict[tuple[str, str], object]) -> None:
    """Each ComfyUI node's mapped node takes its inputs as ComfyUI declares them: every input has a
    counterpart, links are links, text is text, choices are ComfyUI's (after the mapping's value
    conversion; the first is the default), numbers take ComfyUI's default, minimum and maximum."""
    classes = {node_class.type_name: node_class for node_class in NODES}
    for comfy_type, inputs in documented_inputs.items():
        mapping = comfyui.MAPPINGS[comfy_type]
        assert set(mapping.inputs) == set(inputs), comfy_type  # every ComfyUI input has its counterpart
        specs = classes[mapping.type].specs().inputs
        for name, documented in inputs.items():
            spec = specs[mapping.inputs[name]]
            where = f"{comfy_type}.{name}"
            converted = mapping.values.get(name, lambda value: value)
            if "link" in documented:
                assert spec.link_only, where
            elif "string" in documented:
                assert spec.socket_type.name == "STRING", where
                assert spec.default == documented["string"] or (comfy_type, name) in default_differs, where
            elif "boolean" in documented:
                assert spec.socket_type.name == "BOOLEAN" and spec.default is documented["boolean"], where
            elif "files" in documented:
                assert spec.dynamic_choices is not None and spec.dynamic_choices.kind == documented["files"], where
            elif "choices" in documented:
                choices = [converted(choice) for choice in documented["choices"]]
                assert spec.default == choices[0], where
                assert set(spec.choices) <= set(choices), where  # ComfyUI's names, none of our own
            else:
                if (comfy_type, name) not in default_differs:
                    assert spec.default == documented["default"], where
                refused = value_refused.get((comfy_type, name))
                for value in (documented["default"], documented["min"], documented["max"]):
                    if value == refused:
                        with pytest.raises(pydantic.ValidationError):
                            spec.validator.validate_python(value, strict=True)
                    else:
                        assert spec.validator.validate_python(value, strict=True) == value, (where, value)


def test_sd3_and_flux_nodes_take_comfyuis_inputs_names_defaults_and_choices():
    check_comfyui_inputs(COMFYUI_INPUTS, DEFAULT_DIFFERS, VALUE_REFUSED)


_APPLY_NUMBERS = {"strength": {"default": 1.0, "min": 0.0, "max": 10.0},
                  "start_percent": {"default": 0.0, "min": 0.0, "max": 1.0},
                  "end_percent": {"default": 1.0, "min": 0.0, "max": 1.0}}
# As ComfyUI declares them (nodes.py, comfy_extras/nodes_sd3.py, nodes_controlnet.py with
# comfy/cldm/control_types.py); ControlNetApplyAdvanced's vae is optional there, ControlNetApplySD3's not.
CONTROLNET_INPUTS: dict[str, dict[str, dict]] = {
    "ControlNetApplySD3": {"positive": LINK, "negative": LINK, "control_net": LINK, "vae": LINK, "image": LINK,
                           **_APPLY_NUMBERS},
    "ControlNetApplyAdvanced": {"positive": LINK, "negative": LINK, "control_net": LINK, "image": LINK, "vae": LINK,
                                **_APPLY_NUMBERS},
    "SetUnionControlNetType": {"control_net": LINK, "type": {"choices": [
        "auto", "openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal", "segment",
        "tile", "repaint", "canny (InstantX)", "tile (InstantX)", "depth (InstantX)", "blur (InstantX)",
        "pose (InstantX)", "gray (InstantX)", "lq (InstantX)"]}},
}


def test_transformer_controlnet_nodes_take_comfyuis_inputs_names_defaults_and_choices():
    check_comfyui_inputs(CONTROLNET_INPUTS, set(), {})


def test_sd3_and_flux_controlnet_nodes_map_from_both_formats():
    document = {"nodes": [
        ui_widget_node(1, "CheckpointLoaderSimple", ["sd3_medium_incl_clips_t5xxlfp8.safetensors"]),
        ui_widget_node(2, "ControlNetLoader", ["instantx_flux_union.safetensors"]),
        ui_widget_node(3, "SetUnionControlNetType", ["canny (InstantX)"], {"control_net": 1}),
        ui_widget_node(4, "ControlNetApplySD3", [0.5700000000000001, 0, 1],
                       {"positive": 2, "negative": 3, "control_net": 4, "vae": 5, "image": 6}),
        ui_widget_node(5, "CLIPTextEncode", ["a fox"], {"clip": 7}),
        ui_widget_node(6, "LoadImage", ["edges.png", "image"]),
    ], "links": [[1, 2, 0, 3, 0, "CONTROL_NET"], [2, 5, 0, 4, 0, "CONDITIONING"], [3, 5, 0, 4, 1, "CONDITIONING"],
                 [4, 3, 0, 4, 2, "CONTROL_NET"], [5, 1, 2, 4, 3, "VAE"], [6, 6, 0, 4, 4, "IMAGE"],
                 [7, 1, 1, 5, 0, "CLIP"]]}
    nodes = UI.convert(document)["nodes"]
    assert nodes["3"] == {"type": "SetUnionControlNetType", "inputs": {
        "type": "canny (InstantX)", "control_net": link("2", "control_net")}}
    assert nodes["4"] == {"type": "ApplyControlNet", "inputs": {
        "strength": 0.5700000000000001, "start": 0, "end": 1, "positive": link("5", "conditioning"),
        "negative": link("5", "conditioning"), "control_net": link("3", "control_net"), "vae": link("1", "vae"),
        "image": link("6", "image")}}
    api = {"3": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["2", 0], "type": "auto"}},
           "2": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "u.safetensors"}}}
    assert API.convert(api)["nodes"]["3"]["inputs"] == {"control_net": link("2", "control_net"), "type": "auto"}
    api["3"]["inputs"]["type"] = "scribble"  # not one of ComfyUI's names
    assert issues_at(import_error(API, api)) == {("3", "type"): "unsupported_value"}


def test_defaults_of_mappings_are_inputs_comfyui_leaves_implicit():
    classes = {node_class.type_name: node_class for node_class in NODES}
    for comfy_type, mapping in comfyui.MAPPINGS.items():
        specs = classes[mapping.type].specs()
        assert set(mapping.defaults) <= set(specs.inputs) - set(mapping.inputs.values()), comfy_type


FLUX_API = {
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["11", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl_fp16.safetensors",
                                                      "clip_name2": "clip_l.safetensors", "type": "flux",
                                                      "device": "default"}},
    "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}},
    "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
                                                             "sampler": ["16", 0], "sigmas": ["17", 0],
                                                             "latent_image": ["27", 0]}},
    "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
    "17": {"class_type": "BasicScheduler", "inputs": {"scheduler": "simple", "steps": 20, "denoise": 1,
                                                      "model": ["30", 0]}},
    "22": {"class_type": "BasicGuider", "inputs": {"model": ["30", 0], "conditioning": ["26", 0]}},
    "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 219}},
    "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
    "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
    "30": {"class_type": "ModelSamplingFlux", "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": 1024,
                                                         "height": 768, "model": ["12", 0]}},
}


def test_flux_api_graph_maps_to_our_nodes():
    nodes = API.convert(FLUX_API)["nodes"]
    assert {node_id: node["type"] for node_id, node in nodes.items()} == {
        "6": "TextEncode", "8": "VAEDecode", "9": "SaveImage", "10": "LoadVAE", "11": "LoadTextEncoders",
        "12": "LoadDiffusionModel", "13": "Sample", "16": "SelectSampler", "17": "Scheduler", "22": "BasicGuider",
        "25": "RandomNoise", "26": "FluxGuidance", "27": "EmptyLatent", "30": "ModelSamplingFlux"}
    assert nodes["11"]["inputs"] == {"name1": "t5xxl_fp16.safetensors", "name2": "clip_l.safetensors", "type": "flux",
                                     "device": "default"}
    assert nodes["12"]["inputs"] == {"name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}
    assert nodes["22"]["inputs"] == {"model": link("30", "model"), "conditioning": link("26", "conditioning")}
    assert nodes["26"]["inputs"] == {"guidance": 3.5, "conditioning": link("6", "conditioning")}
    assert nodes["30"]["inputs"] == {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 768,
                                     "model": link("12", "model")}
    # The empty latent feeds only SamplerCustomAdvanced: its model is traced through the guider and
    # ModelSamplingFlux to the diffusion model loader.
    assert nodes["27"]["inputs"] == {"width": 1024, "height": 768, "batch_size": 1, "model": link("12", "model")}

    unsupported = copy.deepcopy(FLUX_API)
    unsupported["11"]["inputs"]["type"] = "hunyuan_video"
    unsupported["12"]["inputs"]["weight_dtype"] = "int4"
    error = import_error(API, unsupported)
    assert issues_at(error) == {("11", "type"): "unsupported_value", ("12", "weight_dtype"): "unsupported_value"}
    assert "'hunyuan_video' is not supported here (supported: sdxl, sd3, flux)" in str(error)


def ui_widget_node(node_id: int, node_type: str, widgets: list, links: dict[str, int] | None = None) -> dict:
    return {"id": node_id, "type": node_type, "pos": [0, 10 * node_id], "mode": 0, "widgets_values": widgets,
            "inputs": [{"name": name, "link": link_id} for name, link_id in (links or {}).items()]}


def test_sd3_and_flux_ui_widgets_map_from_each_comfyui_version():
    document = {"nodes": [
        ui_widget_node(1, "CheckpointLoaderSimple", ["sd3.5_large.safetensors"]),
        ui_widget_node(2, "TripleCLIPLoader", ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"]),
        ui_widget_node(3, "ModelSamplingSD3", [3.0], {"model": 1}),
        ui_widget_node(4, "CLIPTextEncodeSD3", ["a", "b", "c", "empty_prompt"], {"clip": 2}),
        ui_widget_node(5, "EmptySD3LatentImage", [1024, 768, 2]),
        ui_widget_node(6, "KSampler", [1, "fixed", 28, 4.5, "euler", "sgm_uniform", 1.0],
                       {"model": 3, "positive": 4, "negative": 5, "latent_image": 6}),
        ui_widget_node(7, "UNETLoader", ["flux1-schnell.safetensors", "default"]),
        ui_widget_node(8, "DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux"]),  # no device yet
        ui_widget_node(9, "CLIPLoader", ["t5xxl_fp16.safetensors"]),  # before the type widget
        ui_widget_node(10, "CLIPTextEncodeFlux", ["x", "y", 2.5], {"clip": 7}),
        ui_widget_node(11, "ModelSamplingFlux", [1.15, 0.5, 1024, 768], {"model": 8}),
        ui_widget_node(12, "FluxGuidance", [4.0], {"conditioning": 9}),
        ui_widget_node(13, "BasicGuider", [], {"model": 10, "conditioning": 11}),
        ui_widget_node(14, "UNETLoader", ["sdxl_lightning_4step_unet.safetensors"]),  # before weight_dtype
    ], "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 4, 0, "CLIP"], [3, 3, 0, 6, 0, "MODEL"],
                 [4, 4, 0, 6, 1, "CONDITIONING"], [5, 4, 0, 6, 2, "CONDITIONING"], [6, 5, 0, 6, 3, "LATENT"],
                 [7, 8, 0, 10, 0, "CLIP"], [8, 7, 0, 11, 0, "MODEL"], [9, 10, 0, 12, 0, "CONDITIONING"],
                 [10, 11, 0, 13, 0, "MODEL"], [11, 12, 0, 13, 1, "CONDITIONING"]]}
    nodes = UI.convert(document)["nodes"]
    assert nodes["2"]["inputs"] == {"name1": "clip_l.safetensors", "name2": "clip_g.safetensors",
                                    "name3": "t5xxl_fp16.safetensors", "type": "sd3"}
    assert nodes["3"]["inputs"] == {"shift": 3.0, "model": link("1", "model")}
    assert nodes["4"]["inputs"] == {"clip_l": "a", "clip_g": "b", "t5xxl": "c", "empty_padding": "empty_prompt",
                                    "clip": link("2", "clip")}
    assert nodes["5"] == {"type": "EmptyLatent", "inputs": {"width": 1024, "height": 768, "batch_size": 2,
                                                            "model": link("1", "model")}}
    assert nodes["7"]["inputs"] == {"name": "flux1-schnell.safetensors", "weight_dtype": "default"}
    assert nodes["8"]["inputs"] == {"name1": "clip_l.safetensors", "name2": "t5xxl_fp16.safetensors", "type": "flux"}
    assert nodes["9"] == {"type": "LoadTextEncoder", "inputs": {"name": "t5xxl_fp16.safetensors"}}
    assert nodes["10"]["inputs"] == {"clip_l": "x", "t5xxl": "y", "guidance": 2.5, "clip": link("8", "clip")}
    assert nodes["11"]["inputs"] == {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 768,
                                     "model": link("7", "model")}
    assert nodes["12"]["inputs"] == {"guidance": 4.0, "conditioning": link("10", "conditioning")}
    assert nodes["13"] == {"type": "BasicGuider", "inputs": {"model": link("11", "model"),
                                                             "conditioning": link("12", "conditioning")}}
    assert nodes["14"] == {"type": "LoadDiffusionModel", "inputs": {"name": "sdxl_lightning_4step_unet.safetensors"}}


# --- image nodes: edges, total pixels, animated saves, bislerp ------------------------------------

# As ComfyUI declares them (comfy_extras/nodes_canny.py, nodes_post_processing.py, nodes_images.py,
# nodes.py): the first choice is the default.
IMAGE_NODE_INPUTS: dict[str, dict[str, dict]] = {
    "Canny": {"image": LINK, "low_threshold": {"default": 0.4, "min": 0.01, "max": 0.99},
              "high_threshold": {"default": 0.8, "min": 0.01, "max": 0.99}},
    "ImageScaleToTotalPixels": {"image": LINK,
                                "upscale_method": {"choices": ["nearest-exact", "bilinear", "area", "bicubic",
                                                               "lanczos"]},
                                "megapixels": {"default": 1.0, "min": 0.01, "max": 16.0},
                                "resolution_steps": {"default": 1, "min": 1, "max": 256}},
    "SaveAnimatedWEBP": {"images": LINK, "filename_prefix": {"string": "ComfyUI"},
                         "fps": {"default": 6.0, "min": 0.01, "max": 1000.0}, "lossless": {"boolean": True},
                         "quality": {"default": 80, "min": 0, "max": 100},
                         "method": {"choices": ["default", "fastest", "slowest"]}},
    "SaveAnimatedPNG": {"images": LINK, "filename_prefix": {"string": "ComfyUI"},
                        "fps": {"default": 6.0, "min": 0.01, "max": 1000.0},
                        "compress_level": {"default": 4, "min": 0, "max": 9}},
    "LatentUpscaleBy": {"samples": LINK,
                        "upscale_method": {"choices": ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]},
                        "scale_by": {"default": 1.5, "min": 0.01, "max": 8.0}},
}
# Our save nodes name their files after the project, as SaveImage does.
IMAGE_DEFAULT_DIFFERS = {("SaveAnimatedWEBP", "filename_prefix"), ("SaveAnimatedPNG", "filename_prefix")}


def test_image_nodes_take_comfyuis_inputs_names_defaults_and_choices():
    check_comfyui_inputs(IMAGE_NODE_INPUTS, IMAGE_DEFAULT_DIFFERS, {})
    classes = {node_class.type_name: node_class for node_class in NODES}
    # Every choice ComfyUI offers is taken, none left out.
    for comfy_type, name in (("ImageScaleToTotalPixels", "upscale_method"), ("SaveAnimatedWEBP", "method"),
                             ("LatentUpscaleBy", "upscale_method"), ("LatentUpscale", "upscale_method")):
        mapping = comfyui.MAPPINGS[comfy_type]
        documented = IMAGE_NODE_INPUTS.get(comfy_type, IMAGE_NODE_INPUTS["LatentUpscaleBy"])[name]["choices"]
        convert = mapping.values.get(name, lambda value: value)
        spec = classes[mapping.type].specs().inputs[mapping.inputs[name]]
        assert set(spec.choices) == {convert(choice) for choice in documented}, comfy_type


def test_image_nodes_map_from_api_and_ui_formats():
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                                  "megapixels": 1}},
        "3": {"class_type": "Canny", "inputs": {"image": ["2", 0], "low_threshold": 0.15, "high_threshold": 0.3}},
        "4": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["3", 0], "filename_prefix": "ComfyUI", "fps": 16.000000000000004, "lossless": False,
            "quality": 85, "method": "default"}},
        "5": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["3", 0], "filename_prefix": "anim", "fps": 24,
                                                          "compress_level": 4}},
    }
    nodes = API.convert(graph)["nodes"]
    assert nodes["2"] == {"type": "ImageScaleToTotalPixels", "inputs": {
        "image": link("1", "image"), "method": "nearest", "megapixels": 1}}
    assert nodes["3"] == {"type": "CannyEdges", "inputs": {"image": link("2", "image"), "low_threshold": 0.15,
                                                           "high_threshold": 0.3}}
    assert nodes["4"] == {"type": "SaveAnimatedWebP", "inputs": {
        "images": link("3", "image"), "filename_prefix": "ComfyUI", "fps": 16.000000000000004, "lossless": False,
        "quality": 85, "method": "default"}}
    assert nodes["5"] == {"type": "SaveAnimatedPNG", "inputs": {
        "images": link("3", "image"), "filename_prefix": "anim", "fps": 24, "compress_level": 4}}

    document = {"nodes": [
        ui_widget_node(1, "LoadImage", ["photo.png", "image"]),
        ui_widget_node(2, "ImageScaleToTotalPixels", ["lanczos", 1], {"image": 1}),  # before resolution_steps
        ui_widget_node(3, "ImageScaleToTotalPixels", ["area", 0.5, 64]),
        ui_widget_node(4, "Canny", [0.3, 0.7000000000000001], {"image": 2}),
        ui_widget_node(5, "SaveAnimatedWEBP", ["ComfyUI", 16, False, 90, "default", ""], {"images": 3}),  # preview
        ui_widget_node(6, "SaveAnimatedPNG", ["ComfyUI", 24, 4], {"images": 4}),
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 4, 0, "IMAGE"], [3, 4, 0, 5, 0, "IMAGE"],
                 [4, 3, 0, 6, 0, "IMAGE"]]}
    nodes = UI.convert(document)["nodes"]
    assert nodes["2"]["inputs"] == {"method": "lanczos", "megapixels": 1, "image": link("1", "image")}
    assert nodes["3"]["inputs"] == {"method": "area", "megapixels": 0.5, "resolution_steps": 64}
    assert nodes["4"]["inputs"] == {"low_threshold": 0.3, "high_threshold": 0.7000000000000001,
                                    "image": link("2", "image")}
    assert nodes["5"]["inputs"] == {"filename_prefix": "ComfyUI", "fps": 16, "lossless": False, "quality": 90,
                                    "method": "default", "images": link("4", "image")}
    assert nodes["6"] == {"type": "SaveAnimatedPNG", "inputs": {"filename_prefix": "ComfyUI", "fps": 24,
                                                                "compress_level": 4, "images": link("3", "image")}}
    # Alone: beside output nodes, a node no output needs that lacks an input is left out (as ComfyUI ignores it).
    nodes = UI.convert({"nodes": [ui_widget_node(7, "LatentUpscaleBy", ["bislerp", 1.5])], "links": []})["nodes"]
    assert nodes["7"]["inputs"] == {"method": "bislerp", "scale_by": 1.5}

    graph["4"]["inputs"]["method"] = "best"
    graph["2"]["inputs"]["upscale_method"] = "bislerp"  # latent nodes only
    assert issues_at(import_error(API, graph)) == {("4", "method"): "unsupported_value",
                                                   ("2", "upscale_method"): "unsupported_value"}


# --- model merging, continuous model sampling ------------------------------------------------------

RATIO = {"default": 1.0, "min": 0.0, "max": 1.0}
MULTIPLIER = {"default": 1.0, "min": -10.0, "max": 10.0}
SD1_BLOCKS = (["time_embed.", "label_emb."] + [f"input_blocks.{i}." for i in range(12)]
              + [f"middle_block.{i}." for i in range(3)] + [f"output_blocks.{i}." for i in range(12)] + ["out."])
SDXL_BLOCKS = (["time_embed.", "label_emb."] + [f"input_blocks.{i}" for i in range(9)]
               + [f"middle_block.{i}" for i in range(3)] + [f"output_blocks.{i}" for i in range(9)] + ["out."])
# As ComfyUI declares them (comfy_extras/nodes_model_merging.py, nodes_model_merging_model_specific.py,
# nodes_model_advanced.py).
MERGING_INPUTS: dict[str, dict[str, dict]] = {
    "ModelMergeSimple": {"model1": LINK, "model2": LINK, "ratio": RATIO},
    "ModelMergeAdd": {"model1": LINK, "model2": LINK},
    "ModelMergeSubtract": {"model1": LINK, "model2": LINK, "multiplier": MULTIPLIER},
    "ModelMergeBlocks": {"model1": LINK, "model2": LINK, "input": RATIO, "middle": RATIO, "out": RATIO},
    "ModelMergeSD1": {"model1": LINK, "model2": LINK, **{block: RATIO for block in SD1_BLOCKS}},
    "ModelMergeSD2": {"model1": LINK, "model2": LINK, **{block: RATIO for block in SD1_BLOCKS}},
    "ModelMergeSDXL": {"model1": LINK, "model2": LINK, **{block: RATIO for block in SDXL_BLOCKS}},
    "CLIPMergeSimple": {"clip1": LINK, "clip2": LINK, "ratio": RATIO},
    "CLIPMergeAdd": {"clip1": LINK, "clip2": LINK},
    "CLIPMergeSubtract": {"clip1": LINK, "clip2": LINK, "multiplier": MULTIPLIER},
    "ModelSamplingContinuousEDM": {
        "model": LINK, "sampling": {"choices": ["v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow"]},
        "sigma_max": {"default": 120.0, "min": 0.0, "max": 1000.0},
        "sigma_min": {"default": 0.002, "min": 0.0, "max": 1000.0}},
}
# A noise level of 0 has no logarithm (the network's timestep is 0.25 ln sigma).
MERGING_VALUE_REFUSED = {("ModelSamplingContinuousEDM", "sigma_max"): 0.0,
                         ("ModelSamplingContinuousEDM", "sigma_min"): 0.0}


def test_merging_nodes_take_comfyuis_inputs_names_defaults_and_choices():
    check_comfyui_inputs(MERGING_INPUTS, set(), MERGING_VALUE_REFUSED)


def test_cosxl_merge_maps_each_block_ratio_from_api_and_ui_files():
    corpus = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
    for form in ("api", "ui"):
        document = json.loads((corpus / f"examples__model_merging__model_merging_cosxl.png__png-{form}.json").read_text())
        nodes = (API if form == "api" else UI).convert(document)["nodes"]
        merge = nodes["13"]
        assert merge["type"] == "MergeModelBlocksSDXL"
        assert merge["inputs"]["model1"] == link("17", "model") and merge["inputs"]["model2"] == link("12", "model")
        assert [merge["inputs"][f"output_blocks_{i}"] for i in range(9)] == [0.5] * 5 + [1.0] * 4
        assert merge["inputs"]["time_embed"] == merge["inputs"]["out"] == merge["inputs"]["input_blocks_8"] == 1.0
        assert nodes["15"] == {"type": "SubtractModels", "inputs": {
            "multiplier": 1.0, "model1": link("4", "model"), "model2": link("16", "model")}}
        assert nodes["19"]["type"] == "AddTextEncoders"
        assert nodes["19"]["inputs"] == {"clip1": link("18", "clip"), "clip2": link("12", "clip")}
        assert nodes["23"] == {"type": "ModelSamplingContinuousEDM", "inputs": {
            "sampling": "v_prediction", "sigma_max": 120.0, "sigma_min": 0.002, "model": link("13", "model")}}
        # The latent's model: traced from its sampler's up through the model sampling to the merge.
        assert nodes["5"]["inputs"]["model"] == link("13", "model")


def test_old_turbo_scheduler_without_denoise_and_merge_widgets_map():
    document = {"nodes": [
        ui_widget_node(1, "CheckpointLoaderSimple", ["a.safetensors"]),
        ui_widget_node(2, "CheckpointLoaderSimple", ["b.safetensors"]),
        ui_widget_node(3, "ModelMergeBlocks", [1.0, 0.25, 0.75], {"model1": 1, "model2": 2}),
        ui_widget_node(4, "SDTurboScheduler", [1], {"model": 5}),  # before the denoise widget
        ui_widget_node(5, "CLIPMergeSubtract", [0.5], {"clip1": 3, "clip2": 4}),
    ], "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 3, 1, "MODEL"], [3, 1, 1, 5, 0, "CLIP"],
                 [4, 2, 1, 5, 1, "CLIP"], [5, 3, 0, 4, 0, "MODEL"]]}
    nodes = UI.convert(document)["nodes"]
    assert nodes["3"] == {"type": "MergeModelBlocks", "inputs": {
        "input": 1.0, "middle": 0.25, "out": 0.75, "model1": link("1", "model"), "model2": link("2", "model")}}
    assert nodes["4"]["inputs"] == {"steps": 1, "model": link("3", "model")}  # denoise: ours defaults to 1
    assert nodes["5"]["inputs"] == {"multiplier": 0.5, "clip1": link("1", "clip"), "clip2": link("2", "clip")}


def test_incomplete_nodes_no_output_needs_are_left_out(api_graph):
    # ComfyUI's area-composition example: a ConditioningCombine with one input, feeding nothing.
    api_graph["20"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0]}}
    api_graph["21"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                       "conditioning_2": ["7", 0]}}
    nodes = API.convert(api_graph)["nodes"]
    assert "20" not in nodes
    assert nodes["21"]["inputs"] == {"a": link("6", "conditioning"), "b": link("7", "conditioning")}  # complete
    api_graph["9"]["inputs"]["images"] = ["22", 0]  # now an output needs it: its missing input is validation's
    api_graph["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    api_graph["3"]["inputs"]["positive"] = ["20", 0]
    assert nodes != (nodes := API.convert(api_graph)["nodes"]) and nodes["20"]["inputs"] == {
        "a": link("6", "conditioning")}


_PERCENT = {"start_percent": {"default": 0.0, "min": 0.0, "max": 1.0}}
_PROPERTIES = {"strength": {"default": 1.0, "min": 0.0, "max": 10.0},
               "set_cond_area": {"choices": ["default", "mask bounds"]}, "mask": LINK, "hooks": LINK,
               "timesteps": LINK}
_HOOK_LORA = {"lora_name": {"files": "loras"}, "strength_model": {"default": 1.0, "min": -20.0, "max": 20.0},
              "prev_hooks": LINK}
# As ComfyUI declares them (comfy_extras/nodes_hooks.py; comfy/hooks.py InterpolationMethod._LIST).
HOOK_INPUTS: dict[str, dict[str, dict]] = {
    "CreateHookLora": {**_HOOK_LORA, "strength_clip": {"default": 1.0, "min": -20.0, "max": 20.0}},
    "CreateHookLoraModelOnly": _HOOK_LORA,
    "SetHookKeyframes": {"hooks": LINK, "hook_kf": LINK},
    "CreateHookKeyframe": {"strength_mult": {"default": 1.0, "min": -20.0, "max": 20.0}, **_PERCENT,
                           "prev_hook_kf": LINK},
    "CreateHookKeyframesInterpolated": {
        "strength_start": {"default": 1.0, "min": 0.0, "max": 10.0},
        "strength_end": {"default": 1.0, "min": 0.0, "max": 10.0},
        "interpolation": {"choices": ["linear", "ease_in", "ease_out", "ease_in_out"]}, **_PERCENT,
        "end_percent": {"default": 1.0, "min": 0.0, "max": 1.0},
        "keyframes_count": {"default": 5, "min": 2, "max": 100}, "print_keyframes": {"boolean": False},
        "prev_hook_kf": LINK},
    "CombineHooks2": {f"hooks_{x}": LINK for x in "AB"},
    "CombineHooks4": {f"hooks_{x}": LINK for x in "ABCD"},
    "CombineHooks8": {f"hooks_{x}": LINK for x in "ABCDEFGH"},
    "SetClipHooks": {"clip": LINK, "apply_to_conds": {"boolean": True}, "schedule_clip": {"boolean": False},
                     "hooks": LINK},
    "ConditioningSetProperties": {"cond_NEW": LINK, **_PROPERTIES},
    "ConditioningSetPropertiesAndCombine": {"cond": LINK, "cond_NEW": LINK, **_PROPERTIES},
    "PairConditioningSetProperties": {"positive_NEW": LINK, "negative_NEW": LINK, **_PROPERTIES},
    "PairConditioningSetPropertiesAndCombine": {"positive": LINK, "negative": LINK, "positive_NEW": LINK,
                                                "negative_NEW": LINK, **_PROPERTIES},
    "SetModelHooksOnCond": {"conditioning": LINK, "hooks": LINK},
    "ConditioningTimestepsRange": {**_PERCENT, "end_percent": {"default": 1.0, "min": 0.0, "max": 1.0}},
}


def test_hook_nodes_take_comfyuis_inputs():
    check_comfyui_inputs(HOOK_INPUTS, set(), {})
    corpus = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
    nodes = API.convert(json.loads((corpus / "hstests__tests__inference__workflows__lora-hooks-1.json").read_text()))[
        "nodes"]
    assert nodes["76"] == {"type": "InterpolateHookKeyframes", "inputs": {
        "strength_start": 0, "strength_end": 1, "interpolation": "linear", "start_percent": 0, "end_percent": 0.5,
        "count": 5, "log_keyframes": True}}
    assert nodes["75"]["inputs"] == {"hooks": link("20", "hooks"), "keyframes": link("76", "keyframes")}
    assert nodes["21"]["inputs"] == {"clip": link("12", "clip"), "hooks": link("75", "hooks"),
                                     "apply_to_conds": True, "schedule_clip": False}
    assert nodes["16"]["type"] == "SetConditioningPairProperties"
    assert nodes["23"]["inputs"]["positive"] == link("16", "positive")
    assert nodes["23"]["inputs"]["negative"] == link("16", "negative")
    model_only = API.convert({"1": {"class_type": "CreateHookLoraModelOnly",
                                    "inputs": {"lora_name": "a.safetensors", "strength_model": 0.5}}})["nodes"]
    assert model_only["1"]["inputs"] == {"name": "a.safetensors", "strength_model": 0.5, "strength_clip": 0.0}


# As ComfyUI declares them (comfy_extras/nodes_photomaker.py).
PHOTOMAKER_INPUTS: dict[str, dict[str, dict]] = {
    "PhotoMakerLoader": {"photomaker_model_name": {"files": "photomaker"}},
    "PhotoMakerEncode": {"photomaker": LINK, "image": LINK, "clip": LINK,
                         "text": {"string": "photograph of photomaker"}},
}


def test_photomaker_nodes_take_comfyuis_inputs():
    check_comfyui_inputs(PHOTOMAKER_INPUTS, set(), {})
    corpus = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
    nodes = API.convert(json.loads((corpus / "cog__examples__api_workflows__photomaker_api.json").read_text()))[
        "nodes"]
    assert nodes["10"] == {"type": "LoadPhotoMaker", "inputs": {"name": "photomaker-v1.bin"}}
    assert nodes["11"] == {"type": "PhotoMakerEncode", "inputs": {
        "text": "photograph of photomaker", "photomaker": link("10", "photomaker"), "image": link("12", "image"),
        "clip": link("4", "clip")}}
    assert nodes["3"]["inputs"]["positive"] == link("11", "conditioning")


# As ComfyUI declares them (nodes.py DiffControlNetLoader, comfy_extras/nodes_hypernetwork.py).
LOADER_INPUTS: dict[str, dict[str, dict]] = {
    "DiffControlNetLoader": {"model": LINK, "control_net_name": {"files": "controlnet"}},
    "HypernetworkLoader": {"model": LINK, "hypernetwork_name": {"files": "hypernetworks"},
                           "strength": {"default": 1.0, "min": -10.0, "max": 10.0}},
}


def test_diff_controlnet_and_hypernetwork_loaders_take_comfyuis_inputs():
    check_comfyui_inputs(LOADER_INPUTS, set(), {})
    corpus = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
    for name, node_id, expected in (
            ("examples__hypernetworks__hypernetwork_example.png__png-ui.json", "10",
             {"type": "LoadHypernetwork", "inputs": {"name": "dantionMarbleStatues_10.pt", "strength": 1.0}}),
            ("examples__controlnet__depth_controlnet.png__png-ui.json", "33",
             {"type": "LoadDiffControlNet", "inputs": {"name": "diff_control_sd15_depth_fp16.safetensors"}})):
        node = UI.convert(json.loads((corpus / name).read_text()))["nodes"][node_id]
        assert node["type"] == expected["type"]
        assert {key: value for key, value in node["inputs"].items() if key != "model"} == expected["inputs"]
        assert node["inputs"]["model"]["output"] == "model"


def test_muted_output_nodes_need_nothing(ui_graph):
    # A muted SaveImage fed by a VAEDecode without its VAE: ComfyUI neither validates nor runs either.
    ui_graph["nodes"] += [
        {"id": 10, "type": "VAEDecode", "mode": 0, "pos": [0, 0],
         "inputs": [{"name": "samples", "type": "LATENT", "link": 10}, {"name": "vae", "type": "VAE", "link": None}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [11]}]},
        {"id": 11, "type": "SaveImage", "mode": 2, "pos": [0, 0], "widgets_values": ["muted"],
         "inputs": [{"name": "images", "type": "IMAGE", "link": 11}]}]
    ui_graph["links"] += [[10, 3, 0, 10, 0, "LATENT"], [11, 10, 0, 11, 0, "IMAGE"]]
    nodes = UI.convert(ui_graph)["nodes"]
    assert "10" not in nodes
    ui_graph["nodes"][-1]["mode"] = 0  # now it runs, and the VAEDecode's missing input is validation's to report
    nodes = UI.convert(ui_graph)["nodes"]
    assert nodes["10"] == {"type": "VAEDecode", "inputs": {"latent": link("3", "latent")}}


# As ComfyUI declares them (nodes.py GLIGENLoader, GLIGENTextBoxApply; MAX_RESOLUTION 16384).
GLIGEN_INPUTS: dict[str, dict[str, dict]] = {
    "GLIGENLoader": {"gligen_name": {"files": "gligen"}},
    "GLIGENTextBoxApply": {"conditioning_to": LINK, "clip": LINK, "gligen_textbox_model": LINK, "text": STRING,
                           "width": {"default": 64, "min": 8, "max": 16384},
                           "height": {"default": 64, "min": 8, "max": 16384},
                           "x": {"default": 0, "min": 0, "max": 16384}, "y": {"default": 0, "min": 0, "max": 16384}},
}


def test_gligen_nodes_take_comfyuis_inputs():
    check_comfyui_inputs(GLIGEN_INPUTS, set(), {})
    corpus = Path(__file__).resolve().parents[1] / "data" / "comfyui_corpus"
    for form, importer in (("api", API), ("ui", UI)):
        document = json.loads((corpus / f"examples__gligen__gligen_textbox_example.png__png-{form}.json").read_text())
        nodes = importer.convert(document)["nodes"]
        assert nodes["10"] == {"type": "LoadGligen", "inputs": {"name": "gligen_sd14_textbox_pruned.safetensors"}}
        assert nodes["27"] == {"type": "ApplyGligenTextBox", "inputs": {
            "text": "sun", "width": 144, "height": 144, "x": 416, "y": 16, "conditioning": link("21", "conditioning"),
            "clip": link("4", "clip"), "gligen": link("10", "gligen")}}
        assert nodes["3"]["inputs"]["positive"] == link("27", "conditioning")
