"""Training, data and evaluation code that made the shipped tiny-shapes demo models."""
