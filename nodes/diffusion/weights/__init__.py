"""Weight files and devices: reading safetensors and pickles safely, building modules from them, patching weights, choosing devices and dtypes."""
