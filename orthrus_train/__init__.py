"""orthrus-train: train lossless multi-token Orthrus draft heads on frozen causal LMs."""
__version__ = "0.1.0"
