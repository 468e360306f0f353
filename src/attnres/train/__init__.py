"""Training: presets, corpora and batches, optimisers, precision, the engines, the loop, compare.

``TrainConfig`` (the run config, :mod:`attnres.storage.config`) and ``RunResult`` (what
:func:`train` returns and writes as ``result.json``, :mod:`attnres.analysis.results`) are defined
in the layers below and re-exported here because ``train`` takes one and returns the other.
"""

from attnres.analysis.results import RunResult
from attnres.storage.config import TrainConfig
from attnres.train.loop import train
from attnres.train.presets import get_preset

__all__ = ["RunResult", "TrainConfig", "get_preset", "train"]
