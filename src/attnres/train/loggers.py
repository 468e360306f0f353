"""Experiment loggers (``train.logger``): TensorBoard or W&B beside ``metrics.jsonl``.

``metrics.jsonl`` stays the record of a run; a logger is a side channel. The loop opens one with
:func:`open_logger` (rank 0 only; other ranks get a :class:`NullLogger`), passes it every step's
metrics record and, at each evaluation, the AttnRes diagnostics of
:func:`attnres.analysis.diagnostics.collect_diagnostics` (per-sublayer output RMS and gradient
norms as scalars, the depth-weight heatmap of :func:`attnres.analysis.profiles.plot_depth_weights`
as an image), and closes it when the run ends.

A logger that fails (a full disk under ``OUT/tensorboard``, W&B refusing a call) warns once and
stops logging; the run goes on. A missing package is an error before training starts
(:func:`require_logger`).

Resuming a run continues its log: TensorBoard writes into the same ``OUT/tensorboard/`` with
``purge_step`` at the first step after the checkpoint, so events a crashed session wrote past it
are hidden; W&B resumes the run whose id is kept in ``OUT/wandb_run_id`` (W&B drops steps at or
below the last one it saw, so steps a crashed session logged past the checkpoint are not rewritten
there).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from attnres.analysis.diagnostics import collect_diagnostics

#: package each logger needs, all in the ``log`` extra
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def require_logger(name: str) -> None:
    """Refuse, before any training, a ``train.logger`` whose package is not installed.

    Raises:
        ModuleNotFoundError: naming the package and the extra that installs it.
    """
    package = PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"train.logger={name} needs the {package} package: pip install 'attnres[log]' "
            "(or run with --train.logger=none)"
        )


def diagnostic_scalars(diag: dict[str, Any]) -> dict[str, float]:
    """Per-sublayer output RMS and gradient norm of :func:`collect_diagnostics`'s ``diag``, as
    ``diag/output_rms/s03_mlp`` and ``diag/grad_norm/s03_mlp`` (sublayer index and kind)."""
    out = {}
    for s in diag["sublayers"]:
        name = f"s{s['index']:02d}_{s['kind']}"
        out[f"diag/output_rms/{name}"] = s["output_rms"]
        out[f"diag/grad_norm/{name}"] = s["grad_norm"]
    return out


def depth_weight_image(diag: dict[str, Any], title: str) -> np.ndarray | None:
    """The depth-weight heatmap of ``diag`` (:func:`plot_depth_weights`) as an RGB ``uint8``
    ``[H, W, 3]`` array; ``None`` for a variant without depth reads (PreNorm)."""
    if not diag["reads"]:
        return None
    import matplotlib.image

    from attnres.analysis.profiles import plot_depth_weights

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_depth_weights([diag], Path(tmp) / "depth_weights.png", title)
        rgba = matplotlib.image.imread(path)  # float32 in [0, 1]
    return (rgba[..., :3] * 255).round().astype(np.uint8)


class Logger:
    """Where a run's metrics go besides ``metrics.jsonl``. Subclasses implement the three writes."""

    name = "none"

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``{tag: value}`` at optimiser step ``step``."""

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Log an RGB ``uint8`` ``[H, W, 3]`` image at ``step``."""

    def close(self) -> None:
        """Flush and release the logger."""

    def log_diagnostics(self, step: int, model: nn.Module, tokens: Tensor, targets: Tensor) -> None:
        """Collect the AttnRes diagnostics of ``model`` on a held-out batch and log them: scalars
        (:func:`diagnostic_scalars`) and the depth-weight heatmap (:func:`depth_weight_image`)."""
        diag = collect_diagnostics(model, tokens, targets)  # the parameters' .grad is untouched
        self.log_scalars(step, diagnostic_scalars(diag))
        image = depth_weight_image(diag, f"{diag['variant']}, step {step}")
        if image is not None:
            self.log_image(step, "diag/depth_weights", image)

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullLogger(Logger):
    """``train.logger=none``, and every rank but 0: logs nothing, and collects no diagnostics."""

    def log_diagnostics(self, step: int, model: nn.Module, tokens: Tensor, targets: Tensor) -> None:
        """Nothing: the diagnostics are not even collected."""


class TensorBoardLogger(Logger):
    """Event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``).

    ``start_step > 0`` (a resumed run) writes ``purge_step = start_step + 1``: TensorBoard hides
    the events of earlier sessions from that step on, which a session that crashed after its last
    checkpoint had written, and keeps those up to the checkpoint.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()  # evaluations are rare; an image is worth having on disk at once

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run under ``out/wandb/``, named after ``out``, with the run's config.

    Its id is kept in ``out/wandb_run_id``, so a resumed run continues the same W&B run. The
    project is ``$WANDB_PROJECT`` (default ``attnres``); ``WANDB_MODE=offline`` keeps it local
    (``wandb sync`` uploads it later).
    """

    name = "wandb"

    def __init__(self, out: str | Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        out = Path(out)
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "attnres"),
            dir=str(out),
            id=run_id,
            name=out.name,
            config=config,
            resume="allow",
        )

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class GuardedLogger(Logger):
    """``inner``, whose first failure warns and turns it into a :class:`NullLogger` for the rest
    of the run: a logger never stops training."""

    def __init__(self, inner: Logger) -> None:
        self.inner, self.name = inner, inner.name

    def _call(self, what: str, *args: Any) -> None:
        try:
            getattr(self.inner, what)(*args)
        except Exception as e:  # a side channel: any failure is reported, not raised
            warnings.warn(
                f"train.logger={self.name} failed ({type(e).__name__}: {e}); it logs nothing more "
                "in this session, the run goes on (metrics.jsonl is unaffected)",
                RuntimeWarning,
                stacklevel=3,
            )
            self.inner = NullLogger()

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._call("log_scalars", step, values)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._call("log_image", step, tag, image)

    def log_diagnostics(self, step: int, model: nn.Module, tokens: Tensor, targets: Tensor) -> None:
        self._call("log_diagnostics", step, model, tokens, targets)

    def close(self) -> None:
        self._call("close")


def open_logger(name: str, out: str | Path, start_step: int, config: dict[str, Any]) -> Logger:
    """The logger ``name`` (``train.logger``) for run directory ``out``, resumed at ``start_step``.

    ``config`` is the run's config as a dict (W&B stores it with the run). A logger that fails to
    open warns and is a :class:`NullLogger`; the run goes on.
    """
    if name == "none":
        return NullLogger()
    if name not in PACKAGES:
        raise ValueError(f"unknown logger {name!r}; valid loggers: none, {', '.join(PACKAGES)}")
    require_logger(name)
    try:
        inner: Logger = (
            TensorBoardLogger(Path(out) / TENSORBOARD_DIR, start_step)
            if name == "tensorboard"
            else WandbLogger(out, config)
        )
    except Exception as e:  # a side channel: see GuardedLogger
        warnings.warn(
            f"train.logger={name} could not start ({type(e).__name__}: {e}); training without it "
            "(metrics.jsonl is unaffected)",
            RuntimeWarning,
            stacklevel=2,
        )
        return NullLogger()
    return GuardedLogger(inner)
