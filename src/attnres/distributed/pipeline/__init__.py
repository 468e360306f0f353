"""Pipeline parallelism with AttnRes cross-stage caching (SPEC §6, paper §4.1).

The model stays single-device code. :func:`split_model` cuts a full :class:`Transformer` into
``C = pp * vpp`` chunks from the outside; chunk ``c`` lives on rank ``c % pp``. What crosses a chunk
boundary is the residual state: for Block/Full AttnRes the completed blocks ``b_0 … b_g`` plus the
live partial sum; for PreNorm one hidden tensor.

Cross-stage caching (``cache``):

``"off"``
    every transition sends all completed blocks plus the partial (SPEC Eq. 7).
``"received"``
    a rank keeps, per micro-batch, the blocks it has *received*; a transition into chunk ``c`` skips
    the blocks that entered chunk ``c - pp``. This is the paper's accounting (SPEC Eq. 8).
``"seen"``
    a rank also keeps the blocks it sealed itself in chunk ``c - pp``, so it is never sent its own
    blocks back. Strictly fewer bytes than ``"received"`` once ``vpp > 1``.

The backward pass mirrors the forward: a gradient crosses exactly the links its block crossed,
in reverse. The gradient of a block a chunk took from its rank's cache is accumulated on that rank
and added, once, to the output gradient of the chunk that put it in the cache.

Modules, one job each:

- :mod:`~attnres.distributed.pipeline.layout`: which chunk holds which sublayers, and the blocks
  entering and leaving each (:class:`PipelineLayout`, :func:`make_layout`).
- :mod:`~attnres.distributed.pipeline.split`: cutting the model into chunks (:func:`split_model`,
  :class:`PipelineChunk`).
- :mod:`~attnres.distributed.pipeline.state`: a residual state as the tensors that cross a boundary.
- :mod:`~attnres.distributed.pipeline.schedule`: each rank's op order and the messages of each op.
- :mod:`~attnres.distributed.pipeline.runner`: one rank's step, with its messages
  (:class:`PipelineRunner`).
"""

from attnres.distributed.pipeline.layout import CACHE_MODES, PipelineLayout, even_bounds, make_layout
from attnres.distributed.pipeline.runner import CommRecord, CommStats, PipelineRunner, check_message, pack
from attnres.distributed.pipeline.schedule import (
    Message,
    Op,
    forward_schedule,
    op_messages,
    schedule,
    schedule_units,
)
from attnres.distributed.pipeline.split import OwnedSublayers, PipelineChunk, SiteRows, split_model

__all__ = [
    "CACHE_MODES",
    "CommRecord",
    "CommStats",
    "Message",
    "Op",
    "OwnedSublayers",
    "PipelineChunk",
    "PipelineLayout",
    "PipelineRunner",
    "SiteRows",
    "check_message",
    "even_bounds",
    "forward_schedule",
    "make_layout",
    "op_messages",
    "pack",
    "schedule",
    "schedule_units",
    "split_model",
]
