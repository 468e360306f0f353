"""The training loop: data, model, optimiser, evaluation, metrics, checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import attnres
from attnres.analysis.diagnostics import save_diagnostics
from attnres.analysis.results import RunResult, read_result, write_result
from attnres.distributed.data_parallel import DistEnv, init_distributed
from attnres.model import Transformer
from attnres.model.compile import check_compile_supported
from attnres.storage.checkpoint import has_checkpoint, load_model, save_checkpoint
from attnres.storage.config import TrainConfig
from attnres.storage.tokenizer import Tokenizer, tokenizer_key
from attnres.train.checkpoint import load_trainer_state
from attnres.train.clock import RunClock
from attnres.train.data import Batches, build_tokenizer, load_corpus, tokenize_corpus
from attnres.train.engine import Batch, Engine, ReplicatedEngine, build_engine, check_world_size
from attnres.train.loggers import NullLogger, open_logger, require_logger
from attnres.train.optim import lr_multiplier
from attnres.train.paths import make_dir
from attnres.train.precision import check_precision_supported
from attnres.train.run_dir import GracefulStop, RunDirLock, TrainingInterrupted, metrics_up_to


def model_flops_per_token(model: Transformer) -> float:
    """Training FLOPs per token: ``6 * (non-embedding params)`` plus causal attention scores."""
    cfg = model.cfg
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
    if cfg.tie_embeddings:  # the LM head is the embedding matrix, listed once, as embed.weight
        params += cfg.vocab_size * cfg.d_model
    attention = 6 * cfg.n_layers * cfg.seq_len * cfg.d_model  # QK^T and AV, causal half, fwd + bwd
    return 6.0 * params + attention


def run_info() -> dict[str, Any]:
    """Versions and git commit, written beside every run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(attnres.__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "attnres": attnres.__version__,
        "git_commit": commit or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import tokenizers

        info["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    return info


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


def _check_out_dir(out: Path, resume: bool, log: Callable[[str], None]) -> bool:
    """Whether the run continues from a checkpoint in ``out``; refuses to mix with another run.

    With ``resume``, a run that stopped before its first checkpoint (``config.json`` and perhaps
    some metrics, no checkpoint) starts over in place, so no run directory is a dead end.
    """
    checkpointed = has_checkpoint(out)
    started = checkpointed or (out / "config.json").exists()
    if resume and not started:
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no checkpoint, no config.json)")
    if not resume and started:
        how = "continue it" if checkpointed else "start it over in place (it has no checkpoint yet)"
        raise FileExistsError(f"{out} already holds a run; pass --resume to {how}, or choose another --out")
    if resume and not checkpointed:
        log(f"{out} stopped before its first checkpoint: starting it over")
    return checkpointed


def _agree(env: DistEnv, value: bool) -> bool:
    """Rank 0's ``value`` on every rank (rank 0 alone inspects the run directory)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> RunResult:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its checkpoint exactly.

    ``stop_after`` ends the run early after that many optimiser steps (with a checkpoint), as an
    interruption would; resuming then continues to ``cfg.train.steps``.
    """
    out = Path(out_dir)
    loop = cfg.train
    if loop.threads:
        torch.set_num_threads(loop.threads)
    device = _device(loop.device)
    require_logger(loop.logger)  # a missing package is refused before the run directory is touched
    check_precision_supported(loop.precision, device)  # before any data is loaded
    if loop.compile:
        check_compile_supported(device)
    env = init_distributed(device.type)  # under torchrun: join the group; rank 0 alone writes
    check_world_size(cfg.parallel, env, cfg.train.batch_size, cfg.train.grad_accum)
    device = env.device if env.distributed else device
    with contextlib.ExitStack() as guards:
        if env.is_main:
            make_dir(out, "run directory")
            guards.enter_context(RunDirLock(out))  # before looking inside: a second run is refused here
            resume = _check_out_dir(out, resume, log)
        else:
            log = lambda _msg: None  # noqa: E731
        resume = _agree(env, resume)
        # one process: Ctrl-C/SIGTERM stop after the step with a checkpoint (torchrun ranks could not
        # agree on the step without a collective per step, so they keep the default signals)
        stop = None if env.distributed else guards.enter_context(GracefulStop(log))
        return _train(cfg, out, env, device, resume, log, stop_after, stop, guards)


def _plain_model(engine: Engine, env: DistEnv) -> Transformer | None:
    """The engine's model when diagnostics can hook it (one process, whole model), else ``None``."""
    if env.distributed or not isinstance(engine, ReplicatedEngine):
        return None
    return engine.model


@dataclasses.dataclass
class _RunData:
    """A run's tokenized corpus and batches, and its config with the tokenizer's vocabulary size."""

    cfg: TrainConfig
    tokenizer: Tokenizer
    batches: Batches
    val_batches: list[Batch]
    corpus_name: str
    train_tokens: int
    val_tokens: int


def _load_data(cfg: TrainConfig, log: Callable[[str], None]) -> _RunData:
    corpus = load_corpus(cfg.data)
    tokenizer = build_tokenizer(cfg.data, corpus)
    if cfg.model.vocab_size != tokenizer.vocab_size:
        log(f"model.vocab_size {cfg.model.vocab_size} -> {tokenizer.vocab_size} (the tokenizer's)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    train_ids, val_ids = tokenize_corpus(cfg.data, corpus, tokenizer, tokenizer_key(tokenizer))
    loop = cfg.train
    batches = Batches(train_ids, val_ids, cfg.model.seq_len, loop.batch_size, loop.data_seed)
    val_batches = batches.val_batches(loop.eval_tokens)
    return _RunData(cfg, tokenizer, batches, val_batches, corpus.name, len(train_ids), len(val_ids))


def _restore(out: Path, engine: Engine, steps: int) -> tuple[int, RunClock]:
    """Load the trainer state of ``out`` into ``engine`` and the RNG: the step to continue from and
    the run's clock."""
    state = load_trainer_state(out)
    engine.load_optimizer_state(state["optimizer"])
    engine.precision.load_state_dict(state.get("grad_scaler", {}))  # absent before fp16-mixed existed
    torch.set_rng_state(state["rng_cpu"])
    start = state["step"]
    if start > steps:
        raise ValueError(
            f"--resume: {out} is at step {start}, past train.steps={steps}; a run cannot be "
            f"shortened (pass --train.steps > {start} to continue it)"
        )
    return start, RunClock.resumed(state.get("timing"))


def _start_run_files(
    out: Path, data: _RunData, n_params: int, device: torch.device, engine: Engine, log: Callable[[str], None]
) -> None:
    """A new run's ``config.json`` and ``run_info.json`` (and no ``metrics.jsonl`` from an attempt
    that stopped before any checkpoint), and its header line."""
    cfg = data.cfg
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (out / "run_info.json").write_text(json.dumps(run_info(), indent=2))
    log(
        f"{cfg.model.residual.variant}: {n_params / 1e6:.2f}M params, {data.train_tokens:,} train / "
        f"{data.val_tokens:,} val tokens ({data.corpus_name}), device {device}"
        + (f", {engine.description}" if engine.description else "")
    )
    if cfg.schedule.warmup_steps > cfg.train.steps:
        log(
            f"note: schedule.warmup_steps={cfg.schedule.warmup_steps} > train.steps={cfg.train.steps}: "
            f"the learning rate peaks at {cfg.train.steps / cfg.schedule.warmup_steps:.2f} x optim.lr"
        )


def _train(
    cfg: TrainConfig,
    out: Path,
    env: DistEnv,
    device: torch.device,
    resume: bool,
    log: Callable[[str], None],
    stop_after: int | None,
    stop: GracefulStop | None,
    guards: contextlib.ExitStack,
) -> RunResult:
    """:func:`train` once the run directory is held and the resume decision made; ``guards``
    closes what the run opens (its logger) however it ends."""
    data = _load_data(cfg, log)
    cfg, loop = data.cfg, data.cfg.train
    torch.manual_seed(loop.seed)  # every rank builds the same full model: the single-process init
    model = Transformer(cfg.model).to(device)
    if resume:  # full weights, so any layout can resume
        model.load_state_dict(load_model(out, device)[0].state_dict())
    n_params, flops_per_token = sum(p.numel() for p in model.parameters()), model_flops_per_token(model)
    engine = build_engine(model, cfg, env)
    del model  # a pipeline rank keeps only its own chunks
    start, clock, last_loss = 0, RunClock(), math.nan
    if resume:
        start, clock = _restore(out, engine, loop.steps)
        if start == loop.steps and (out / "result.json").exists():
            log(f"{out} finished all {start} steps earlier; nothing to train")
            return read_result(out)
        log(f"resumed {out} at step {start}")
        if env.is_main:  # drop records past the checkpoint (written before a crash)
            kept = metrics_up_to(out / "metrics.jsonl", start)
            if kept:  # the result of a run that ends right here (it stopped before writing result.json)
                last_loss = kept[-1]["loss"]
    elif env.is_main:
        _start_run_files(out, data, n_params, device, engine, log)
    session = _Session(out, env, device, engine, data, clock, stop, guards)
    end = loop.steps if stop_after is None else min(loop.steps, start + stop_after)
    last_loss, val_loss = session.run(start, end, last_loss)
    if math.isnan(val_loss):
        val_loss = engine.evaluate(data.val_batches)
    tokens_per_step = loop.batch_size * cfg.model.seq_len
    result = RunResult(
        variant=cfg.model.residual.variant,
        seed=loop.seed,
        steps=end,
        final_val_loss=val_loss,
        final_train_loss=last_loss,
        tokens_per_s=clock.tokens_per_s(tokens_per_step),
        n_params=n_params,
        train_tokens=end * tokens_per_step,
        train_flops=end * tokens_per_step * flops_per_token,
        seconds=clock.state()["seconds"],
    )
    if end == loop.steps and session.plain is not None:  # distributed runs skip the diagnostics
        save_diagnostics(session.plain, *session.held_out, out)
    if end == loop.steps and env.is_main:
        write_result(result, out)
    return result


class _Session:
    """One session of a run: its steps from ``start`` to ``end``, their records and checkpoints.

    Rank 0 alone writes ``metrics.jsonl`` and the logger's side channel; diagnostics (at each
    evaluation for the logger, and at the end) need the plain model, so only one-process runs of
    the whole model collect them.
    """

    def __init__(
        self,
        out: Path,
        env: DistEnv,
        device: torch.device,
        engine: Engine,
        data: _RunData,
        clock: RunClock,
        stop: GracefulStop | None,
        guards: contextlib.ExitStack,
    ) -> None:
        self.out, self.env, self.engine, self.data, self.clock, self.stop = (
            out,
            env,
            engine,
            data,
            clock,
            stop,
        )
        self.guards = guards
        self.plain = _plain_model(engine, env)
        # the diagnostics' held-out batch
        self.held_out = tuple(t.to(device) for t in data.val_batches[0]) if self.plain is not None else ()
        self.tokens_per_step = data.cfg.train.batch_size * data.cfg.model.seq_len

    def run(self, start: int, end: int, last_loss: float) -> tuple[float, float]:
        """Steps ``start … end-1``; returns the last training loss and the last validation loss (NaN
        if no step evaluated)."""
        cfg, loop, engine = self.data.cfg, self.data.cfg.train, self.engine
        metrics = (self.out / "metrics.jsonl").open("a") if self.env.is_main else None
        logger = (
            self.guards.enter_context(open_logger(loop.logger, self.out, start, dataclasses.asdict(cfg)))
            if self.env.is_main
            else NullLogger()
        )
        bar = tqdm(
            range(start, end),
            initial=start,
            total=loop.steps,
            disable=not loop.progress or not self.env.is_main,
            desc=cfg.model.residual.variant,
            unit="step",
            dynamic_ncols=True,
        )
        val_loss = math.nan
        self.clock.start()
        for step in bar:
            record = self._step(step, first_of_session=step == start)
            last_loss, done = record["loss"], step + 1
            evaluating = done % loop.eval_every == 0 or done == loop.steps
            if evaluating:
                val_loss = record["val_loss"] = engine.evaluate(self.data.val_batches)
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            logger.log_scalars(done, {k: v for k, v in record.items() if k != "step"})
            if evaluating and self.plain is not None:
                logger.log_diagnostics(done, self.plain, *self.held_out)
            bar.set_postfix(
                loss=f"{last_loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}"
            )
            stopping = self.stop is not None and self.stop.requested
            if (loop.checkpoint_every and done % loop.checkpoint_every == 0) or done == end or stopping:
                self.checkpoint(done)
            if stopping:
                bar.close()
                metrics.close()
                raise TrainingInterrupted(self.out, done, saved=True)
        bar.close()
        if metrics is not None:
            metrics.close()
        if self.stop is not None and self.stop.requested:  # asked before this session's first step finished
            raise TrainingInterrupted(self.out, start, saved=False)
        return last_loss, val_loss

    def _step(self, step: int, first_of_session: bool) -> dict[str, Any]:
        """One optimiser step; its ``metrics.jsonl`` record (without the evaluation)."""
        loop, engine = self.data.cfg.train, self.engine
        t0 = time.perf_counter()
        engine.optimizer.set_lr(lr_multiplier(step, loop.steps, self.data.cfg.schedule))
        stats = engine.train_step(*self.data.batches.train_batch(step))
        if not math.isfinite(stats.loss):
            raise FloatingPointError(f"training loss became {stats.loss} at step {step + 1}; lower optim.lr")
        dt = time.perf_counter() - t0
        self.clock.record(dt, first_of_session)
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": stats.loss,
            "lr": engine.optimizer.param_groups[0]["lr"],
            "tokens_per_s": self.tokens_per_step / dt,
        }
        if stats.grad_norm is not None:
            record["grad_norm"] = stats.grad_norm
        if (scale := engine.loss_scale()) is not None:  # fp16-mixed: the scale after this step
            record["loss_scale"] = scale
        return record

    def checkpoint(self, step: int) -> None:
        """Save the run at ``step``: weights, config, tokenizer and the trainer state."""
        plain, optim_state = self.engine.checkpoint_state()  # collectives under FSDP2 and pipelines
        if self.env.is_main:
            trainer_state = {
                "step": step,
                "optimizer": optim_state,
                "rng_cpu": torch.get_rng_state(),
                "timing": self.clock.state(),
                "grad_scaler": self.engine.precision.state_dict(),  # {} unless fp16-mixed
            }
            save_checkpoint(self.out, plain, self.data.cfg, self.data.tokenizer, trainer_state)
