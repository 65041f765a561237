"""Infinite hierarchical contrastive clustering (IH-CC) in JAX and Flax."""

__version__ = "0.1.0"
