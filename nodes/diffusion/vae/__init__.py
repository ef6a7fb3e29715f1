"""Autoencoders between pixels and latents, their latent formats, and cheap latent previews."""
