"""Stable Diffusion for nodegraph: the model library (U-Net, VAE, text encoders, tokenizer, ControlNet, checkpoints) in plain torch, and the diffusion nodes."""
