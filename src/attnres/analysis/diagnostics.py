"""Training-dynamics diagnostics on a held-out batch (paper Fig. 5b, 5c and Fig. 8).

Per sublayer: the RMS of its output, the RMS of the hidden state it receives, and the gradient
norm of its parameters. Per depth read (AttnRes-style variants): the weights averaged over
tokens, with the sources named, and the entropy of the weights. Everything is observed from
outside the model: forward hooks on ``model.sublayers[i]`` and the residual scheme's optional
``recorder``; the model's loop is unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnres.model import Transformer, lm_loss

DIAGNOSTICS_FILE = "diagnostics.json"


def sublayer_kind(index: int) -> str:
    """``attn`` for even sublayers, ``mlp`` for odd ones."""
    return "attn" if index % 2 == 0 else "mlp"


def _rms(x: Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


def read_entropy(weights: Tensor) -> float:
    """Mean over tokens and heads of the entropy (nats) of one read's weights ``[N, ..., H]``.

    Weights that do not sum to 1 (sigmoid reads) are normalised over sources first, so the number
    is the entropy of where the read looks, comparable across normalisers; ``log N`` is uniform.
    """
    p = weights.float() / weights.float().sum(0, keepdim=True).clamp_min(1e-30)
    return (-(p * p.clamp_min(1e-30).log()).sum(0)).mean().item()


def collect_diagnostics(model: Transformer, tokens: Tensor, targets: Tensor) -> dict[str, Any]:
    """Run one forward and backward on ``tokens [B, T]`` and return the diagnostics as plain data.

    Gradients are taken with ``torch.autograd.grad``, so the parameters' ``.grad`` is untouched.

    Returns a JSON-ready dict: ``variant``, ``n_layers``, ``loss``, ``sublayers`` (per sublayer
    ``index, layer, kind, input_rms, output_rms, grad_norm``), ``reads`` (per read site ``site,
    kind`` (``attn``/``mlp``/``final``), ``sources`` (``emb``, ``s<i>`` for the output of sublayer
    ``i``, ``sum`` for block sums), ``weights`` averaged over tokens and heads, ``head_weights``
    ``[H][N]``, ``entropy``, ``max_entropy = log N``).
    """
    L = model.cfg.n_sublayers
    emb: list[Tensor] = []
    outputs: list[Tensor] = []
    rms_in: list[float] = []
    rms_out: list[float] = []
    reads: dict[int, dict[str, Any]] = {}

    def on_sublayer(module, args, out):
        rms_in.append(_rms(args[0]))
        rms_out.append(_rms(out))
        outputs.append(out)

    def label(src: Tensor) -> str:
        if emb and src is emb[0]:
            return "emb"
        return next((f"s{i}" for i, o in enumerate(outputs) if src is o), "sum")

    def recorder(site: int, sources, weights: Tensor) -> None:
        w = weights.detach().float()
        w = w.expand(len(sources), *tokens.shape, w.shape[-1])  # [N, B, T, H]
        reads[site] = {
            "site": site,
            "kind": "final" if site == L else sublayer_kind(site),
            "sources": [label(s) for s in sources],
            "weights": w.mean((1, 2, 3)).tolist(),
            "head_weights": w.mean((1, 2)).T.tolist(),  # [H][N]
            "entropy": read_entropy(w),
            "max_entropy": math.log(len(sources)),
        }

    scheme = model.residual
    previous, checkpointing = scheme.recorder, model.activation_checkpointing
    handles = [model.embed.register_forward_hook(lambda m, a, o: emb.append(o))]
    handles += [sub.register_forward_hook(on_sublayer) for sub in model.sublayers]
    scheme.recorder = recorder
    model.set_activation_checkpointing("none")  # a recomputation would run the hooks twice
    try:
        with torch.enable_grad():
            loss = lm_loss(model(tokens), targets)
            params = [[p for p in sub.parameters() if p.requires_grad] for sub in model.sublayers]
            flat = [p for group in params for p in group]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        scheme.recorder = previous
        model.set_activation_checkpointing(checkpointing)
        for h in handles:
            h.remove()
    grad_norms, i = [], 0
    for group in params:
        sq = sum(float(g.float().pow(2).sum()) for g in grads[i : i + len(group)] if g is not None)
        grad_norms.append(math.sqrt(sq))
        i += len(group)
    return {
        "variant": model.cfg.residual.variant,
        "n_layers": model.cfg.n_layers,
        "n_sublayers": L,
        "loss": loss.item(),
        "batch": list(tokens.shape),
        "sublayers": [
            {
                "index": j,
                "layer": j // 2,
                "kind": sublayer_kind(j),
                "input_rms": rms_in[j],
                "output_rms": rms_out[j],
                "grad_norm": grad_norms[j],
            }
            for j in range(L)
        ],
        "reads": [reads[s] for s in sorted(reads)],
    }


def save_diagnostics(model: Transformer, tokens: Tensor, targets: Tensor, out_dir: str | Path) -> Path:
    """Collect the diagnostics on a held-out batch and write ``out_dir/diagnostics.json``."""
    path = Path(out_dir) / DIAGNOSTICS_FILE
    path.write_text(json.dumps(collect_diagnostics(model, tokens, targets), indent=1))
    return path


def load_diagnostics(run_dir: str | Path) -> dict[str, Any] | None:
    """``run_dir/diagnostics.json``, or ``None`` when the run has none."""
    path = Path(run_dir) / DIAGNOSTICS_FILE
    return json.loads(path.read_text()) if path.exists() else None
