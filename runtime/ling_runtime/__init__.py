"""Serving runtime for the Ling-2.6 hybrid MLA + Lightning-attention MoE model."""

__version__ = "0.1.0"
