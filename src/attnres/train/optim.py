"""Optimisers (AdamW, Muon + AdamW) and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from attnres.storage.config import OptimConfig, ScheduleConfig


class OptimizerGroup:
    """Several optimisers stepped as one (Muon for matrices, AdamW for the rest).

    Every param group carries ``base_lr``; :func:`set_lr` scales it by the schedule.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * multiplier


def _is_vector_like(name: str) -> bool:
    """Norm gains and residual-scheme parameters: never decayed, never orthogonalised."""
    return name.startswith("residual.") or name.endswith("norm.weight") or name.endswith(".bias")


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> OptimizerGroup:
    """AdamW over everything, or Muon for sublayer weight matrices plus AdamW for the rest.

    ``named_parameters`` are ``(name, parameter)`` pairs named as in the full model
    (``model.named_parameters()``); a pipeline passes its chunks' parameters under those names, so
    the groups follow the same rules in every layout.

    Weight decay applies to matrices only. Residual-scheme parameters (pseudo-queries, key gains,
    mixing scalars) are per-read-site vectors even when stored as one ``[L+1, d]`` tensor, so they
    are never decayed: decay would pull the queries back to the uniform-average init.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    seen: set[int] = set()
    named = [(n, p) for n, p in named if not (id(p) in seen or seen.add(id(p)))]  # tied weights once
    vectors = [p for n, p in named if _is_vector_like(n) or p.dim() < 2]
    matrices = [(n, p) for n, p in named if not (_is_vector_like(n) or p.dim() < 2)]
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        groups = [
            {"params": [p for _, p in matrices], "weight_decay": cfg.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
        return OptimizerGroup([torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)])
    muon = [p for n, p in matrices if n.startswith("sublayers.")]
    adam_matrices = [p for n, p in matrices if not n.startswith("sublayers.")]
    adam_groups = [
        {"params": adam_matrices, "weight_decay": cfg.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return OptimizerGroup(
        [
            torch.optim.Muon(
                muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
            ),
            torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=betas),
        ]
    )


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The schedule's multiplier on the peak lr for optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))  # wsd
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - cfg.min_lr_ratio) * min(1.0, (step - decay_start + 1) / decay_steps)
