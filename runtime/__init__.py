"""Kiln's cloud-agnostic core: servables, engines, the repository and the protocol-neutral app."""

__version__ = "0.1.0"
