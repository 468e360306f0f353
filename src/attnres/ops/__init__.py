"""Functional core: depth reads over lists of sources. No modules, no config."""

from attnres.ops.reference import depth_read, depth_weights

__all__ = ["depth_read", "depth_weights"]
