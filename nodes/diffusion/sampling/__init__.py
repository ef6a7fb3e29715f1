"""Sampling: noise schedules, samplers, how a model is driven at a noise level, guidance, and the sampling run."""
