"""Residual variants behind one interface: ``init_state / layer_input / update / final``."""

from attnres.residuals.base import ResidualConfig, ResidualScheme, build_residual
from attnres.residuals.registry import register, variant_names

__all__ = ["ResidualConfig", "ResidualScheme", "build_residual", "register", "variant_names"]
