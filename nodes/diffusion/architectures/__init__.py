"""Model architectures as files hold them: detection from keys and shapes, and loading each family's parts (networks, VAE, text encoders) with its key mappings and LoRA names."""
