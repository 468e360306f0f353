"""Residual variants behind one interface: ``init_state / layer_input / update / final``."""

from attnres.residuals.base import ResidualConfig, ResidualScheme, build_residual
from attnres.residuals.registry import options_class, register, variant_names

__all__ = ["ResidualConfig", "ResidualScheme", "build_residual", "options_class", "register", "variant_names"]
