"""A preallocated key/value cache for incremental decoding.

Why there is no cache of depth sources
--------------------------------------
AttnRes is *token-local* (SPEC §5). Every depth read of token ``t`` combines only token ``t``'s
own sources (its embedding, its block sums or sublayer outputs), so nothing about earlier tokens'
depth state is ever read again. The only thing that crosses tokens is self-attention, and that is
served by the ordinary attention key/value cache below. Within one forward the depth sources of
the tokens being processed (``N·T·d`` elements) are transient: they are freed when the forward
ends, which is why chunked prefill bounds them to ``N·chunk·d``.

Decode steps and prefill run without gradients, so AttnRes reads them with the two-phase read on a
stack of the completed blocks (:mod:`attnres.ops.stacked`, chosen by ``impl="auto"``): a group's
reads share one pass over the blocks, and each later read merges in the live partial sum.

Layout
------
Columns of the cache are *slots*, shared by all rows of the batch. A left-padded batch writes its
padding into slots too, and :attr:`KVCache.valid` marks which slots hold real tokens; RoPE
positions are counted per row over real tokens only (:attr:`KVCache.next_position`), so a padded
row sees exactly what it would see alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnres.model.config import ModelConfig


class KVCache:
    """Keys and values of every attention sublayer, preallocated for ``capacity`` slots.

    Use it through the model: ``model(tokens, cache=cache)`` appends the new tokens' keys and
    values and attends over everything cached so far. The model calls :meth:`begin` once per
    forward and each attention sublayer calls :meth:`update`.

    Args:
        cfg: the model config (layers, KV heads, head size).
        batch: rows in the batch; every forward through this cache must use it.
        capacity: slots to allocate; prompt length (padding included) plus new tokens.
            ``None``: ``cfg.seq_len``.
        dtype, device: of the cached keys and values (match the model's).

    Attributes:
        k, v: ``[n_layers, B, Hkv, capacity, hd]``.
        valid: ``[B, capacity]`` bool, True where a slot holds a real token (not padding).
        length: slots written so far.
        next_position: ``[B]`` RoPE position of each row's next real token (its real tokens so far).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        capacity = cfg.seq_len if capacity is None else capacity
        if batch < 1 or capacity < 1:
            raise ValueError(f"KVCache needs batch >= 1 and capacity >= 1, got {batch} and {capacity}")
        shape = (cfg.n_layers, batch, cfg.kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self._mask: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def begin(self, n_new: int, attention_mask: Tensor | None = None, batch: int | None = None) -> Tensor:
        """Reserve slots for ``n_new`` tokens per row and return their RoPE positions ``[B, n_new]``.

        Args:
            n_new: tokens per row in this forward.
            attention_mask: ``[B, n_new]``, true (or 1) for real tokens and false for padding;
                ``None``: all real.
            batch: rows of this forward's tokens, checked against the cache's (``None``: unchecked).
        """
        if batch is not None and batch != self.batch:
            raise ValueError(
                f"the tokens have batch size {batch} but this KVCache was made for batch size "
                f"{self.batch}; use one cache per batch, e.g. KVCache(model.cfg, {batch}, capacity)"
            )
        start, end = self.length, self.length + n_new
        if end > self.capacity:
            raise ValueError(
                f"KV cache is full: {self.length} slots used + {n_new} new > capacity {self.capacity}; "
                "allocate a KVCache with a larger capacity"
            )
        device = self.valid.device
        if attention_mask is None:
            new_valid = torch.ones(self.batch, n_new, dtype=torch.bool, device=device)
        else:
            if tuple(attention_mask.shape) != (self.batch, n_new):
                raise ValueError(
                    f"attention_mask must be [batch, new tokens] = {(self.batch, n_new)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            new_valid = attention_mask.to(device=device, dtype=torch.bool)
        # A padding token takes the position of the next real token; it is never attended to.
        positions = self.next_position[:, None] + new_valid.long().cumsum(1) - new_valid.long()
        self.valid[:, start:end] = new_valid
        self.next_position += new_valid.sum(1)
        self.length = end
        # Query i (slot start+i) sees real slots up to itself, and always itself, so a padding
        # query still has one finite key and never produces NaN.
        slot = torch.arange(end, device=device)
        query_slot = slot[start:, None]  # [n_new, 1]
        causal = slot[None, :] <= query_slot  # [n_new, end]
        self._mask = (causal & self.valid[:, None, :end]) | (slot[None, :] == query_slot)
        self._mask = self._mask[:, None]  # [B, 1, n_new, end]: broadcast over heads
        return positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store this forward's keys and values ``[B, Hkv, n_new, hd]`` of Transformer layer ``layer``.

        Returns all cached keys and values ``[B, Hkv, length, hd]`` and the boolean attention
        mask ``[B, 1, n_new, length]`` (true = may attend) for this forward.
        """
        if self._mask is None:
            raise RuntimeError("KVCache.update called before KVCache.begin; pass the cache to the model")
        start = self.length - k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Training through a cache (a padded batch): the buffers are written in place for every
            # layer, which autograd forbids for tensors it saved; attend over a copy instead.
            self.k[layer, :, :, start : self.length] = k.detach()
            self.v[layer, :, :, start : self.length] = v.detach()
            k = torch.cat([self.k[layer, :, :, :start], k], dim=2)
            v = torch.cat([self.v[layer, :, :, :start], v], dim=2)
            return k, v, self._mask
        self.k[layer, :, :, start : self.length] = k
        self.v[layer, :, :, start : self.length] = v
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length], self._mask
