"""The reference decoder-only LM."""

from attnres.model.config import ModelConfig
from attnres.model.transformer import Transformer, lm_loss

__all__ = ["ModelConfig", "Transformer", "lm_loss"]
