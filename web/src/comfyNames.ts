// ComfyUI's names for our node types (generated from nodes/diffusion/nodes/comfyui.py MAPPINGS by
// `python tests/web/test_comfy_names.py --write`; tests/web/test_comfy_names.py keeps it equal), so the
// node search finds TextEncode by "CLIPTextEncode". Used for a node type whose catalogue entry does not
// carry its own `comfyui_names`.

export const COMFYUI_NAMES: Record<string, string[]> = {
  "AddConditioningPairWithProperties": [
    "PairConditioningSetPropertiesAndCombine"
  ],
  "AddConditioningWithProperties": [
    "ConditioningSetPropertiesAndCombine"
  ],
  "AddModels": [
    "ModelMergeAdd"
  ],
  "AddTextEncoders": [
    "CLIPMergeAdd"
  ],
  "ApplyControlNet": [
    "ControlNetApplyAdvanced",
    "ControlNetApplySD3"
  ],
  "ApplyControlNetSimple": [
    "ControlNetApply"
  ],
  "ApplyGligenTextBox": [
    "GLIGENTextBoxApply"
  ],
  "ApplyStyleModel": [
    "StyleModelApply"
  ],
  "BasicGuider": [
    "BasicGuider"
  ],
  "CLIPVisionEncode": [
    "CLIPVisionEncode"
  ],
  "CannyEdges": [
    "Canny"
  ],
  "CombineHooks": [
    "CombineHooks2",
    "CombineHooks4",
    "CombineHooks8"
  ],
  "CompileModel": [
    "TorchCompileModel"
  ],
  "ConditioningCombine": [
    "ConditioningCombine"
  ],
  "ConditioningConcat": [
    "ConditioningConcat"
  ],
  "ConditioningSetArea": [
    "ConditioningSetArea"
  ],
  "ConditioningSetMask": [
    "ConditioningSetMask"
  ],
  "ConditioningSetTimestepRange": [
    "ConditioningSetTimestepRange"
  ],
  "ConditioningZeroOut": [
    "ConditioningZeroOut"
  ],
  "CreateHookKeyframe": [
    "CreateHookKeyframe"
  ],
  "CreateLoraHook": [
    "CreateHookLora",
    "CreateHookLoraModelOnly"
  ],
  "DifferentialDiffusion": [
    "DifferentialDiffusion"
  ],
  "DisableNoise": [
    "DisableNoise"
  ],
  "DualGuider": [
    "DualCFGGuider"
  ],
  "EmptyLatent": [
    "EmptyLatentImage",
    "EmptySD3LatentImage"
  ],
  "FluxGuidance": [
    "FluxGuidance"
  ],
  "Guider": [
    "CFGGuider"
  ],
  "ImageBatch": [
    "ImageBatch"
  ],
  "ImageCompositeMasked": [
    "ImageCompositeMasked"
  ],
  "ImageScale": [
    "ImageScale"
  ],
  "ImageScaleBy": [
    "ImageScaleBy"
  ],
  "ImageScaleToTotalPixels": [
    "ImageScaleToTotalPixels"
  ],
  "ImageStitch": [
    "ImageStitch"
  ],
  "ImageToMask": [
    "ImageToMask"
  ],
  "InpaintModelConditioning": [
    "InpaintModelConditioning"
  ],
  "InstructPix2PixConditioning": [
    "InstructPixToPixConditioning"
  ],
  "InterpolateHookKeyframes": [
    "CreateHookKeyframesInterpolated"
  ],
  "InvertImage": [
    "ImageInvert"
  ],
  "InvertMask": [
    "InvertMask"
  ],
  "KSampler": [
    "KSampler"
  ],
  "KSamplerAdvanced": [
    "KSamplerAdvanced"
  ],
  "KontextImageScale": [
    "FluxKontextImageScale"
  ],
  "LatentComposite": [
    "LatentComposite"
  ],
  "LatentFromBatch": [
    "LatentFromBatch"
  ],
  "LatentUpscale": [
    "LatentUpscale"
  ],
  "LatentUpscaleBy": [
    "LatentUpscaleBy"
  ],
  "LoadCLIPVision": [
    "CLIPVisionLoader"
  ],
  "LoadCheckpoint": [
    "CheckpointLoaderSimple"
  ],
  "LoadControlNet": [
    "ControlNetLoader"
  ],
  "LoadDiffControlNet": [
    "DiffControlNetLoader"
  ],
  "LoadDiffusionModel": [
    "UNETLoader"
  ],
  "LoadGligen": [
    "GLIGENLoader"
  ],
  "LoadHypernetwork": [
    "HypernetworkLoader"
  ],
  "LoadImage": [
    "LoadImage"
  ],
  "LoadLora": [
    "LoraLoader",
    "LoraLoaderModelOnly"
  ],
  "LoadMask": [
    "LoadImageMask"
  ],
  "LoadPhotoMaker": [
    "PhotoMakerLoader"
  ],
  "LoadStyleModel": [
    "StyleModelLoader"
  ],
  "LoadTextEncoder": [
    "CLIPLoader"
  ],
  "LoadTextEncoders": [
    "DualCLIPLoader",
    "TripleCLIPLoader"
  ],
  "LoadUnclipCheckpoint": [
    "unCLIPCheckpointLoader"
  ],
  "LoadVAE": [
    "VAELoader"
  ],
  "MaskToImage": [
    "MaskToImage"
  ],
  "MergeModelBlocks": [
    "ModelMergeBlocks"
  ],
  "MergeModelBlocksSD1": [
    "ModelMergeSD1",
    "ModelMergeSD2"
  ],
  "MergeModelBlocksSDXL": [
    "ModelMergeSDXL"
  ],
  "MergeModels": [
    "ModelMergeSimple"
  ],
  "MergeTextEncoders": [
    "CLIPMergeSimple"
  ],
  "ModelSamplingContinuousEDM": [
    "ModelSamplingContinuousEDM"
  ],
  "ModelSamplingDiscrete": [
    "ModelSamplingDiscrete"
  ],
  "ModelSamplingFlux": [
    "ModelSamplingFlux"
  ],
  "ModelSamplingSD3": [
    "ModelSamplingSD3"
  ],
  "PadForOutpaint": [
    "ImagePadForOutpaint"
  ],
  "PhotoMakerEncode": [
    "PhotoMakerEncode"
  ],
  "PreviewImage": [
    "PreviewImage"
  ],
  "RandomNoise": [
    "RandomNoise"
  ],
  "ReferenceLatent": [
    "ReferenceLatent"
  ],
  "RepeatLatentBatch": [
    "RepeatLatentBatch"
  ],
  "SDTurboScheduler": [
    "SDTurboScheduler"
  ],
  "Sample": [
    "SamplerCustomAdvanced"
  ],
  "SamplerCustom": [
    "SamplerCustom"
  ],
  "SaveAnimatedPNG": [
    "SaveAnimatedPNG"
  ],
  "SaveAnimatedWebP": [
    "SaveAnimatedWEBP"
  ],
  "SaveImage": [
    "SaveImage"
  ],
  "Scheduler": [
    "BasicScheduler"
  ],
  "SelectSampler": [
    "KSamplerSelect"
  ],
  "SetClipHooks": [
    "SetClipHooks"
  ],
  "SetClipSkip": [
    "CLIPSetLastLayer"
  ],
  "SetConditioningPairProperties": [
    "PairConditioningSetProperties"
  ],
  "SetConditioningProperties": [
    "ConditioningSetProperties"
  ],
  "SetFirstSigma": [
    "SetFirstSigma"
  ],
  "SetHookKeyframes": [
    "SetHookKeyframes"
  ],
  "SetLatentNoiseMask": [
    "SetLatentNoiseMask"
  ],
  "SetModelHooksOnConditioning": [
    "SetModelHooksOnCond"
  ],
  "SetUnionControlNetType": [
    "SetUnionControlNetType"
  ],
  "SplitSigmas": [
    "SplitSigmas"
  ],
  "SubtractModels": [
    "ModelMergeSubtract"
  ],
  "SubtractTextEncoders": [
    "CLIPMergeSubtract"
  ],
  "TextEncode": [
    "CLIPTextEncode"
  ],
  "TextEncodeFlux": [
    "CLIPTextEncodeFlux"
  ],
  "TextEncodeSD3": [
    "CLIPTextEncodeSD3"
  ],
  "TextEncodeSDXL": [
    "CLIPTextEncodeSDXL"
  ],
  "TimestepsRange": [
    "ConditioningTimestepsRange"
  ],
  "UnclipConditioning": [
    "unCLIPConditioning"
  ],
  "VAEDecode": [
    "VAEDecode"
  ],
  "VAEDecodeTiled": [
    "VAEDecodeTiled"
  ],
  "VAEEncode": [
    "VAEEncode"
  ],
  "VAEEncodeForInpaint": [
    "VAEEncodeForInpaint"
  ],
  "VAEEncodeTiled": [
    "VAEEncodeTiled"
  ]
};
