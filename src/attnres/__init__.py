"""attnres: Attention Residuals (Kimi Team, 2026), the reference implementation.

Data flows one way: ``ops -> residuals -> model -> train -> cli``.
"""

__version__ = "0.1.0"
