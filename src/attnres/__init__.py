"""attnres: Attention Residuals (Kimi Team, 2026), the reference implementation.

Data flows one way: ``ops -> residuals -> model -> train -> cli``.
"""

__version__ = "0.1.0"

__all__ = ["AttnResidual", "ResidualStream", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy, so that `import attnres` (the CLI's first step) does not import torch.
    if name in ("AttnResidual", "ResidualStream"):
        from attnres import dropin

        return getattr(dropin, name)
    raise AttributeError(f"module 'attnres' has no attribute {name!r}")
