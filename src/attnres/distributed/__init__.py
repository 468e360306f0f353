"""Parallelism applied from outside the single-device model: pipeline stages with AttnRes
cross-stage caching and communication accounting (``pipeline``), multi-process launch helpers."""

from attnres.distributed.launch import exit_process_group
from attnres.distributed.pipeline import (
    CACHE_MODES,
    CommStats,
    PipelineChunk,
    PipelineLayout,
    PipelineRunner,
    make_layout,
    schedule,
    split_model,
)

__all__ = [
    "CACHE_MODES",
    "CommStats",
    "PipelineChunk",
    "PipelineLayout",
    "PipelineRunner",
    "exit_process_group",
    "make_layout",
    "schedule",
    "split_model",
]
