"""Tokenizers and text encoders (CLIP, OpenCLIP, T5), prompt syntax and textual-inversion embeddings."""
