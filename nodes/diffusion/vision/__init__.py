"""Image encoders: the CLIP vision towers that unCLIP models and SDXL's image prompts (revision) read."""
