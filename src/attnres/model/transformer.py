"""The reference decoder-only LM: RoPE, RMSNorm, SwiGLU, grouped-query attention.

Every attention and every MLP is one *sublayer* with its own pre-norm. How sublayer inputs are
formed from earlier outputs is entirely the residual scheme's job (``attnres.residuals``), so the
loop (:meth:`Transformer.run_sublayers`) never branches on the variant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attnres.model.cache import KVCache
from attnres.model.config import ModelConfig
from attnres.residuals import build_residual

#: dtypes ``nn.Embedding`` takes as indices
TOKEN_DTYPES = (torch.int64, torch.int32)

#: the target id :func:`lm_loss` ignores (padding, prompt tokens)
IGNORE_INDEX = -100

#: what :meth:`Transformer.set_activation_checkpointing` accepts
CHECKPOINT_MODES = ("none", "sublayer", "block")


def check_token_ids(tokens: Tensor, vocab_size: int, what: str = "token ids") -> None:
    """Raise unless ``tokens`` is an integer tensor of ids in ``[0, vocab_size)``.

    The one check of token ids, shared by the model's forward and by generation's prompts.

    Args:
        tokens: a tensor of any shape.
        vocab_size: the model's ``vocab_size``.
        what: how the error names the ids (``"token ids"``, ``"prompt 2's token ids"``).

    Raises:
        TypeError: ``tokens`` is not ``int64`` or ``int32`` (float, bool, uint8 … would be
            truncated, reinterpreted or refused deep inside the embedding).
        ValueError: an id is negative or ``>= vocab_size`` (skipped while ``torch.compile`` traces).
    """
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(
            f"{what} must be integers (torch.int64 or torch.int32), got dtype {tokens.dtype}; "
            "tokenize text first, and convert integer-valued tensors with .long()"
        )
    if tokens.numel() and not torch.compiler.is_compiling():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{what} must lie in [0, {vocab_size}) (model.vocab_size), got range [{lo}, {hi}]; "
                "was the data tokenized with a different tokenizer?"
            )


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``[seq_len, head_dim / 2]`` in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, hd]`` by position (rotate-half layout).

    ``cos``/``sin`` are ``[T, hd/2]``, or ``[B, 1, T, hd/2]`` when rows have their own positions.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention, including its own pre-norm.

    ``layer`` is this attention's Transformer-layer index: its row in a :class:`KVCache`.
    """

    def __init__(self, cfg: ModelConfig, norm: bool = True, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if norm else nn.Identity()
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, normed: bool = False
    ) -> Tensor:
        """``normed``: ``h`` is already ``norm(h)`` (a depth read fused with this pre-norm)."""
        x = h if normed else self.norm(h)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v, mask = cache.update(self.layer, k, v)  # all cached slots: [B, Hkv, S, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, d]


class MLP(nn.Module):
    """SwiGLU feed-forward, including its own pre-norm.

    It ignores ``cos``, ``sin`` and ``cache``: every sublayer takes the same arguments, so the
    layer loop never branches on the sublayer type.
    """

    def __init__(self, cfg: ModelConfig, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if norm else nn.Identity()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.w_down = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, normed: bool = False
    ) -> Tensor:
        """``normed``: ``h`` is already ``norm(h)`` (a depth read fused with this pre-norm)."""
        x = h if normed else self.norm(h)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Transformer(nn.Module):
    """Decoder-only LM whose residual connections are a pluggable scheme.

    ``sublayers[2i]`` is layer ``i``'s attention and ``sublayers[2i+1]`` its MLP.

    Attributes:
        activation_checkpointing: what a training forward recomputes in the backward instead of
            keeping (:meth:`set_activation_checkpointing`); ``"none"`` after construction.
    """

    activation_checkpointing: str = "none"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.residual = build_residual(cfg.residual, cfg.d_model, cfg.n_sublayers)
        norm = type(self.residual).sublayer_norm
        self.sublayers = nn.ModuleList(
            block for i in range(cfg.n_layers) for block in (Attention(cfg, norm, i), MLP(cfg, norm))
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every initialisation in the model, in one place.

        ======================================  ==========================================
        parameter                               init
        ======================================  ==========================================
        ``embed.weight``                        N(0, init_std)
        attention ``wq, wk, wv``                N(0, init_std)
        MLP ``w_gate, w_up``                    N(0, init_std)
        attention ``wo``, MLP ``w_down``        N(0, init_std / sqrt(2 * n_layers)): these
                                                write into the residual stream
        ``lm_head.weight`` (untied)             N(0, init_std)
        every RMSNorm gain                      1
        residual scheme                         ``residual.reset_parameters()``; for AttnRes:
                                                pseudo-queries ``query`` **0** (the first
                                                forward is a uniform average over sources),
                                                key-norm gains ``key_gain`` 1
        ======================================  ==========================================
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for sub in self.sublayers:
            for name, p in sub.named_parameters():
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                elif name.startswith(("wo.", "w_down.")):
                    nn.init.normal_(p, std=out_std)
                else:
                    nn.init.normal_(p, std=std)
        nn.init.ones_(self.norm.weight)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        self.residual.reset_parameters()

    def set_activation_checkpointing(self, mode: str) -> None:
        """Choose what a training forward recomputes in the backward instead of keeping.

        It applies to forwards with gradients enabled and no ``cache`` (a recomputation would
        append to the cache twice); others run as with ``"none"``. The gradients are those without
        checkpointing, up to the order of floating-point sums: the model has no randomness (no
        dropout), and ``torch.utils.checkpoint`` with ``use_reentrant=False`` would restore the RNG
        state anyway.

        Args:
            mode: ``"none"``: keep every activation. ``"sublayer"``: recompute each sublayer
                ``f_l(h)`` (its norm and attention or MLP); depth reads and residual updates keep
                theirs. ``"block"``: recompute groups of ``residual.checkpoint_group()``
                sublayers, depth reads and updates included, keeping only the residual state at
                group boundaries (reduced by ``residual.carry``). For Block AttnRes a group is one
                block of ``S`` sublayers, so what is kept is the block representations and the live
                partial sum, as in the paper's training schedule; Full AttnRes groups single
                sublayers (every output is a source and is kept anyway); ``hierarchical`` groups
                its ``S``; every other variant groups one Transformer layer (attention and MLP).

        Raises:
            ValueError: ``mode`` is not one of :data:`CHECKPOINT_MODES`.
        """
        if mode not in CHECKPOINT_MODES:
            raise ValueError(
                f"activation checkpointing {mode!r} is not one of: {', '.join(CHECKPOINT_MODES)}"
            )
        self.activation_checkpointing = mode

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise a clear error for non-integer tokens, ids outside ``[0, vocab_size)``, an empty or a
        too-long sequence."""
        if not isinstance(tokens, Tensor):
            raise TypeError(
                f"tokens must be a [batch, seq] tensor of integer ids, got {type(tokens).__name__}"
            )
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq] integer ids, got shape {tuple(tokens.shape)}")
        if 0 in tokens.shape:
            raise ValueError(
                f"tokens must hold at least one sequence of one token, got shape {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds model.seq_len={self.cfg.seq_len}; "
                "truncate the input or build the model with a larger seq_len"
            )
        check_token_ids(tokens, self.cfg.vocab_size)

    def hidden(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        layer_inputs: list[Tensor] | None = None,
    ) -> Tensor:
        """The final read's output ``[B, T, d]``, before the final norm (:meth:`normed_hidden`: after it).

        Args:
            tokens: ``[B, T]`` token ids.
            cache: a :class:`KVCache`; the tokens continue the sequences cached so far, their keys
                and values are appended to it. ``None``: a plain causal forward from position 0
                (training).
            positions: ``[B, T]`` RoPE positions. ``None``: ``0 … T-1`` without a cache; with one,
                each row continues from its own count of real tokens.
            attention_mask: ``[B, T]``, false (or 0) marks padding, which no token attends to
                (needs ``cache``; left-pad prompts of different lengths).
            layer_inputs: a list to which the input of every Transformer layer is appended, in
                order: the residual stream's read that feeds the layer's attention sublayer
                (sublayer ``2i``; for AttnRes, that sublayer's depth read; for ``prenorm``, the
                running sum, so layer 0's input is the embedding). Activation checkpointing is off
                for a forward that collects them.
        """
        return self.residual.final(self._final_state(tokens, cache, positions, attention_mask, layer_inputs))

    def normed_hidden(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """``norm(hidden(...))``, what the LM head reads; the arguments are those of :meth:`hidden`.

        Without gradients an AttnRes final read runs fused with the norm
        (:meth:`~attnres.residuals.base.ResidualScheme.normed_final`).
        """
        return self.residual.normed_final(
            self._final_state(tokens, cache, positions, attention_mask), self.norm
        )

    def _final_state(
        self,
        tokens: Tensor,
        cache: KVCache | None,
        positions: Tensor | None,
        attention_mask: Tensor | None,
        layer_inputs: list[Tensor] | None = None,
    ) -> Any:
        """The residual state after the last sublayer; the arguments are those of :meth:`hidden`."""
        self.check_tokens(tokens)
        T = tokens.shape[1]
        if cache is not None:
            row_positions = cache.begin(T, attention_mask, batch=tokens.shape[0])
            positions = row_positions if positions is None else positions
        elif attention_mask is not None:
            raise ValueError("attention_mask needs a KVCache: pass cache=KVCache(model.cfg, batch, T)")
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            self._check_positions(positions, tokens.shape)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # [B, 1, T, hd/2]
        state = self.residual.init_state(self.embed(tokens))
        return self.run_segment(state, 0, len(self.sublayers), cos, sin, cache, layer_inputs)

    def run_segment(
        self,
        state: Any,
        start: int,
        stop: int,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        layer_inputs: list[Tensor] | None = None,
    ) -> Any:
        """:meth:`run_sublayers` under this model's :attr:`activation_checkpointing`.

        It applies to forwards with gradients enabled, no ``cache`` and no ``layer_inputs``. With
        ``"block"``, the groups of ``residual.checkpoint_group()`` sublayers are counted from
        sublayer 0 and cut at ``start`` and ``stop``, so a pipeline chunk that begins or ends inside
        a group recomputes its share of it; the state returned is ready for the read at ``stop``.
        Like :meth:`run_sublayers`, it reads only ``activation_checkpointing``, ``residual`` and
        ``sublayers``, so a pipeline chunk runs it with itself as the model.
        """
        # the layers' inputs are read out of the forward as it runs: nothing to recompute around them
        recomputing = torch.is_grad_enabled() and cache is None and layer_inputs is None
        mode = self.activation_checkpointing if recomputing else "none"
        if mode != "block":
            return Transformer.run_sublayers(
                self,
                state,
                start,
                stop,
                cos,
                sin,
                cache,
                recompute=mode == "sublayer",
                layer_inputs=layer_inputs,
            )
        size = self.residual.checkpoint_group()
        edges = [
            start,
            *range((start // size + 1) * size, stop, size),
            stop,
        ]  # group ends, cut to the segment
        for a, b in zip(edges, edges[1:], strict=False):
            if a < b:
                state = Transformer._recomputed_group(self, state, range(a, b), cos, sin)
        return self.residual.resume(state, stop)

    def run_sublayers(
        self,
        state: Any,
        start: int,
        stop: int,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        recompute: bool = False,
        layer_inputs: list[Tensor] | None = None,
    ) -> Any:
        """The residual state after sublayers ``start … stop-1`` ran on ``state``: the sublayer loop.

        :meth:`hidden` runs it over every sublayer (or per checkpointed group), and a pipeline chunk
        over the sublayers it owns (``attnres.distributed.pipeline``). It reads only ``self.residual``
        and ``self.sublayers[l]`` for the global sublayer index ``l``, which a chunk provides too.

        Args:
            state: the residual state before sublayer ``start``.
            start, stop: the sublayers to run, ``start <= stop``.
            cos, sin: RoPE tables for the tokens (see :meth:`hidden`).
            cache: a :class:`KVCache` the attention sublayers append to, or ``None``.
            recompute: checkpoint each sublayer ``f_l(h)`` (``"sublayer"`` activation checkpointing).
            layer_inputs: as in :meth:`hidden`.

        Unless ``recompute`` (which checkpoints the sublayer with its input before the norm), each
        sublayer first asks ``residual.fused_normed_input`` for its normalised input (AttnRes
        without gradients fuses the pre-norm into its read; the sublayer then skips its norm, and
        forward hooks on it see that normalised input); otherwise it gets ``layer_input`` and
        applies its own norm. ``layer_inputs`` are read with ``layer_input`` in either case.
        """
        for layer in range(start, stop):
            sublayer = self.sublayers[layer]
            recorded = layer_inputs is not None and layer % 2 == 0
            # a recomputed sublayer is checkpointed with its input before the norm
            x = None if recompute else self.residual.fused_normed_input(state, layer, sublayer.norm)
            # recorded inputs are read again, unfused: recording them leaves the forward's numbers as they are
            h = self.residual.layer_input(state, layer) if x is None or recorded else None
            if recorded:
                layer_inputs.append(h)
            if x is not None:  # the read applied the sublayer's pre-norm in its own pass
                out = sublayer(x, cos, sin, cache=cache, normed=True)
            elif recompute:
                out = checkpoint(sublayer, h, cos, sin, use_reentrant=False)
            else:
                out = sublayer(h, cos, sin, cache=cache)
            state = self.residual.update(state, layer, out)
        return state

    def _recomputed_group(self, state: Any, layers: range, cos: Tensor, sin: Tensor) -> Any:
        """Sublayers ``layers`` under one checkpoint: the backward keeps only the carried state."""

        def run(carried: Any) -> Any:
            resumed = self.residual.resume(carried, layers.start)
            return self.residual.carry(
                Transformer.run_sublayers(self, resumed, layers.start, layers.stop, cos, sin)
            )

        return checkpoint(run, self.residual.carry(state), use_reentrant=False)

    def _check_positions(self, positions: Tensor, shape: torch.Size) -> None:
        if positions.shape != shape:
            raise ValueError(
                f"positions must match tokens' shape {tuple(shape)}, got {tuple(positions.shape)}"
            )
        if positions.numel() and not torch.compiler.is_compiling():
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= self.cfg.seq_len:
                raise ValueError(
                    f"positions must lie in [0, {self.cfg.seq_len}) (model.seq_len), got [{lo}, {hi}]; "
                    "the sequence has outgrown the context: generate fewer tokens or raise seq_len"
                )

    def forward(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``; the arguments are those of :meth:`hidden`."""
        return self.lm_head(self.normed_hidden(tokens, cache, positions, attention_mask))


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy, in fp32 or wider; ``targets`` equal to ``IGNORE_INDEX`` (-100) are ignored.

    ``reduction``: ``"mean"`` over the counted targets, or their ``"sum"`` (gradient accumulation
    divides the sums of its micro-batches by the whole batch's count).
    """
    logits = logits.flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
