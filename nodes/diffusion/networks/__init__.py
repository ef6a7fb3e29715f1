"""The denoising networks, one module per family, and the blocks they share."""
