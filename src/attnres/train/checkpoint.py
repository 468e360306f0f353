"""Checkpoints: safetensors weights, the JSON config, the tokenizer and the trainer state.

Layout of ``OUT/checkpoint/``::

    model.safetensors   weights (safetensors; tied weights stored once)
    config.json         the full TrainConfig
    tokenizer.json      the tokenizer (BPE JSON, or a byte-tokenizer marker)
    trainer_state.pt    step, optimiser state and RNG states, for an exact ``--resume``

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-save never
leaves a half-written checkpoint behind the old one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from attnres.configs import from_dict
from attnres.model import Transformer
from attnres.train.config import TrainConfig
from attnres.train.data import Tokenizer

CHECKPOINT_DIR = "checkpoint"
_TMP, _OLD = f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old"  # the two sides of a checkpoint swap
_WRITTEN_LAST = "trainer_state.pt"  # a checkpoint folder holding it is complete


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir/checkpoint`` exists, after finishing a checkpoint swap a crash interrupted.

    :func:`save_checkpoint` moves the old checkpoint aside, then the new, complete one into place.
    Stopped in between, the run holds ``.checkpoint.tmp`` (complete) and ``.checkpoint.old``, and
    no ``checkpoint``: the newer one is put in place, so the run resumes instead of looking lost.
    """
    run = Path(run_dir)
    final, tmp, old = (run / name for name in (CHECKPOINT_DIR, _TMP, _OLD))
    if not final.exists() and old.exists():
        (tmp if (tmp / _WRITTEN_LAST).is_file() else old).rename(final)
    return final.exists()


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself if it holds a checkpoint, else ``path/checkpoint``; a clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    has_checkpoint(p)
    for candidate in (p, p / CHECKPOINT_DIR):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{p} holds no checkpoint: expected model.safetensors and config.json in it "
        f"or in {p / CHECKPOINT_DIR}"
    )


def save_checkpoint(
    out_dir: str | Path,
    model: Transformer,
    cfg: TrainConfig,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``out_dir/checkpoint`` atomically and return its path."""
    has_checkpoint(out_dir)  # an interrupted swap is finished before this one starts
    final, tmp, old = (Path(out_dir) / name for name in (CHECKPOINT_DIR, _TMP, _OLD))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    st_save_model(model, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    tokenizer.save(tmp / "tokenizer.json")
    torch.save(trainer_state, tmp / _WRITTEN_LAST)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_config(path: str | Path) -> TrainConfig:
    """The TrainConfig stored with a checkpoint (``path``: run dir or checkpoint dir)."""
    p = checkpoint_path(path)
    try:
        data = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / 'config.json'} is corrupted: {e}") from None
    return from_dict(TrainConfig, data)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, TrainConfig]:
    """Rebuild the model of a checkpoint with its weights (``path``: run dir or checkpoint dir)."""
    p = checkpoint_path(path)
    cfg = load_config(p)
    model = Transformer(cfg.model)
    try:
        missing, unexpected = st_load_model(
            model, str(p / "model.safetensors"), strict=False, device=str(device)
        )
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(
            f"{p / 'model.safetensors'} is corrupted or truncated ({e}); re-save or re-train"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{p / 'model.safetensors'} does not match its config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return model.to(device), cfg


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Step, optimiser and RNG states saved next to the weights."""
    return torch.load(checkpoint_path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
