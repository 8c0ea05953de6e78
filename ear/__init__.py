"""EAR Studio: Expanding Autoregressive Representation, centre-outward image generation."""

__version__ = "0.1.0"
