"""Checkpoints: safetensors weights, the JSON run config, the tokenizer, and the trainer state.

Layout of ``OUT/checkpoint/``::

    model.safetensors   weights (safetensors; tied weights stored once)
    config.json         the full TrainConfig
    tokenizer.json      the tokenizer (BPE JSON, or a byte-tokenizer marker)
    trainer_state.pt    step, optimiser state, RNG states and the fp16 gradient scaler's state, for an
                        exact ``--resume``
    checksums.json      the sha256 of each file above, written last

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-save never
leaves a half-written checkpoint behind the old one.

This module writes all five files and reads back what rebuilds a model: the config, the weights
(every tensor's shape checked against the config) and the tokenizer (its vocabulary checked
against the model's). The trainer state is opaque here: :func:`save_checkpoint` writes the dict
it is given, and training reads it back (:func:`attnres.train.checkpoint.load_trainer_state`).

Loading is safe for a checkpoint from someone else: no file is unpickled. The weights are
safetensors, the config and tokenizer JSON, and the trainer state is read with
``torch.load(weights_only=True)``, which refuses any object other than tensors and plain
containers. Each file is checked against ``checksums.json`` before it is read (:func:`verified`),
so a flipped byte or a hand-edited file is named instead of loading silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from attnres.configs import from_dict
from attnres.model import Transformer
from attnres.storage.config import TrainConfig
from attnres.storage.tokenizer import Tokenizer, load_tokenizer

CHECKPOINT_DIR = "checkpoint"
_TMP, _OLD = f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old"  # the two sides of a checkpoint swap
CHECKSUMS = "checksums.json"
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
_WRITTEN_LAST = CHECKSUMS  # a checkpoint folder holding it is complete
#: the ``trainer_state`` of a checkpoint made without training (attnres convert --from-hf): it loads
#: and samples, but cannot resume (:func:`attnres.train.checkpoint.load_trainer_state` says so)
WEIGHTS_ONLY_STATE = {"weights_only": True}


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or holds something other than it should."""


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
            if not (candidate / "trainer_state.pt").is_file() and _is_hf_folder(candidate):
                raise CheckpointError(
                    f"{candidate} is a Hugging Face transformers folder, not an attnres checkpoint; "
                    f"convert it first (attnres convert --from-hf {candidate} OUT) and use OUT"
                )
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
    try:
        st_save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        tokenizer.save(tmp / "tokenizer.json")
        # through memory: torch.save into a file reports a full disk only as "unexpected pos N vs M";
        # a plain write raises ENOSPC like every other file here
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        (tmp / "trainer_state.pt").write_bytes(buffer.getbuffer())
        record_checksums(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the old checkpoint stays; free what the new one took
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_checksums(ckpt: Path) -> None:
    """Write ``ckpt/checksums.json``: the sha256 of each checkpoint file, as :func:`verified` checks."""
    sums = {name: _sha256(ckpt / name) for name in CHECKPOINT_FILES}
    (ckpt / CHECKSUMS).write_text(json.dumps(sums, indent=2))


def verified(ckpt: Path, name: str) -> Path:
    """``ckpt/name`` after checking it against the checkpoint's ``checksums.json``.

    Raises:
        CheckpointError: the file is missing, or its content is not what was saved (a flipped byte,
            a truncated copy, a hand edit), naming the file.
    """
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint in {ckpt} is incomplete")
    sums = ckpt / CHECKSUMS
    if not sums.is_file():  # written before checkpoints carried checksums: nothing to compare with
        warnings.warn(f"{ckpt} has no {CHECKSUMS} (an older checkpoint): {name} not verified", stacklevel=3)
        return path
    try:
        expected = json.loads(sums.read_text())[name]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{sums} is corrupted or lacks {name}: the checkpoint cannot be verified"
        ) from None
    if _sha256(path) != expected:
        raise CheckpointError(
            f"{path} does not match the sha256 recorded in {sums} when it was saved: the file is corrupted "
            "or was changed; restore it from a good copy, or train again"
        )
    return path


def _is_hf_folder(folder: Path) -> bool:
    """A transformers folder: its config.json names a ``model_type`` (ours never does)."""
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def load_config(path: str | Path) -> TrainConfig:
    """The TrainConfig stored with a checkpoint (``path``: run dir or checkpoint dir)."""
    p = checkpoint_path(path)
    config = verified(p, "config.json")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config} is corrupted: {e}") from None
    return from_dict(TrainConfig, data)


def run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory trains: its checkpoint's, or for a run that stopped before its
    first checkpoint, the ``config.json`` it was started with."""
    run = Path(run_dir)
    if run.is_dir() and has_checkpoint(run):
        return load_config(run)
    started = run / "config.json"
    if not started.is_file():
        raise FileNotFoundError(f"--resume: {run} holds no run to resume (no checkpoint, no config.json)")
    try:
        return from_dict(TrainConfig, json.loads(started.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{started} is corrupted: {e}") from None


def _shape_mismatches(model: Transformer, weights: Path) -> list[str]:
    """Tensors whose stored shape differs from the model's (a config that does not fit the weights)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    return [
        f"{name} {list(stored[name])} in the weights, {list(shape)} by the config"
        for name, shape in expected.items()
        if name in stored and stored[name] != shape
    ]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, TrainConfig]:
    """Rebuild the model of a checkpoint with its weights (``path``: run dir or checkpoint dir)."""
    p = checkpoint_path(path)
    cfg = load_config(p)
    model = Transformer(cfg.model)
    weights = verified(p, "model.safetensors")
    try:
        mismatched = _shape_mismatches(model, weights)
        if mismatched:
            raise CheckpointError(
                f"{weights} does not fit {p / 'config.json'} (model.d_model={cfg.model.d_model}, "
                f"n_layers={cfg.model.n_layers}, vocab_size={cfg.model.vocab_size}): "
                + "; ".join(mismatched[:3])
                + (f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
            )
        missing, unexpected = st_load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupted or truncated ({e}); re-save or re-train") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return model.to(device), cfg


def load_checkpoint_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved with a checkpoint, verified, and checked against the model's vocabulary.

    Raises:
        CheckpointError: the tokenizer file is corrupted, or its vocabulary is not the model's
            (a tokenizer from another run would sample garbage).
    """
    p = checkpoint_path(path)
    tokenizer = load_tokenizer(verified(p, "tokenizer.json"))
    vocab = load_config(p).model.vocab_size
    if tokenizer.vocab_size != vocab:
        raise CheckpointError(
            f"{p / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model was trained on "
            f"{vocab}: the tokenizer belongs to another run"
        )
    return tokenizer
