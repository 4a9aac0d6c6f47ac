"""skipbench: benchmark autoregressive, two-model speculative and LayerSkip self-speculative decoding."""

__version__ = "0.1.0"
