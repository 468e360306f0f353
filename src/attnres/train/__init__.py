"""Training: configs and presets, data and tokenizers, optimisers, the loop, checkpoints."""

from attnres.train.config import TrainConfig
from attnres.train.loop import RunResult, train
from attnres.train.presets import get_preset

__all__ = ["RunResult", "TrainConfig", "get_preset", "train"]
