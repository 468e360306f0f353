"""The ``parallel`` section of a run config: how ``attnres train`` spreads over processes.

It lives with the code it configures; the run config (:class:`attnres.storage.config.TrainConfig`)
holds it as its ``parallel`` field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Multi-process training under ``torchrun`` (``attnres.distributed``).

    With ``pp = 1``, every process holds the whole model and trains on its slice of the batch (DDP,
    or FSDP2 with ``dp_shard``). With ``pp > 1``, the model is cut into ``pp * vpp`` pipeline
    chunks, one process per stage: ``torchrun --nproc-per-node=<pp>``. Pipeline and data
    parallelism do not combine (yet): the world size must equal ``pp``.

    Attributes:
        dp_shard: shard parameters, gradients and optimiser state with FSDP2 ``fully_shard``
            instead of replicating them with DDP. Only matters with more than one process.
        pp: pipeline stages (processes).
        vpp: virtual pipeline stages per process: ``1`` runs GPipe, ``> 1`` interleaved 1F1B.
        microbatches: micro-batches per step in the pipeline (0: ``pp``). Must divide
            ``train.batch_size``; with ``vpp > 1`` it must be a multiple of ``pp``.
        attnres_cache: cross-stage caching of AttnRes blocks in the pipeline: a process keeps the
            blocks it has seen for a micro-batch (received or sealed itself), and later transitions
            send only new ones (``PipelineRunner`` cache ``"seen"``; off: ``"off"``).
    """

    dp_shard: bool = False
    pp: int = 1
    vpp: int = 1
    microbatches: int = 0
    attnres_cache: bool = True

    def __post_init__(self) -> None:
        if self.pp < 1 or self.vpp < 1 or self.microbatches < 0:
            raise ValueError(
                f"parallel.pp and parallel.vpp must be >= 1 and parallel.microbatches >= 0, got "
                f"{self.pp}, {self.vpp} and {self.microbatches}"
            )
        if self.pp == 1 and (self.vpp > 1 or self.microbatches):
            raise ValueError(
                "parallel.vpp and parallel.microbatches apply to pipeline runs only; set parallel.pp > 1 "
                "(and launch that many processes), or leave them at 1 and 0"
            )
        if self.pipeline and self.dp_shard:
            raise ValueError(
                "FSDP2 (parallel.dp_shard=true) does not combine with parallel.pp > 1; use one or the other"
            )
        if self.vpp > 1 and self.n_microbatches % self.pp:
            raise ValueError(
                f"interleaved 1F1B (parallel.vpp={self.vpp}) needs parallel.microbatches to be a multiple "
                f"of parallel.pp={self.pp}, got {self.n_microbatches}"
            )

    @property
    def pipeline(self) -> bool:
        """Whether the model is cut into pipeline stages."""
        return self.pp > 1

    @property
    def n_microbatches(self) -> int:
        """Micro-batches per pipeline step (``microbatches``, or ``pp`` when it is 0)."""
        return self.microbatches or self.pp
