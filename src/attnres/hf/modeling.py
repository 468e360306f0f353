"""transformers wrappers around the reference :class:`attnres.model.Transformer`.

The wrappers hold one ``Transformer`` and call its own methods, so the HF logits are the native
logits, operation for operation. Checkpoint keys are the native keys under ``model.transformer.``.

Generation uses our own :class:`attnres.model.cache.KVCache` (through :class:`HFKVCache`, which
adds the few methods ``generate`` calls), so greedy, sampling and beam search all decode one token
per step. Padded batches (``attention_mask`` with zeros, left- or right-padded) run through the same
cache, which gives every row the positions and attention it would have alone.

``output_hidden_states=True`` returns ``n_layers + 1`` tensors ``[B, T, d]``: the input of each
Transformer layer, which is the residual stream's read feeding that layer's *attention* sublayer
(for AttnRes its depth read; for ``prenorm`` the running sum, so the first is the embedding), then
the final read, the one the final norm is applied to. (Llama-style models return the last one
*after* their final norm; ours is before it, like every other entry a residual-stream read.)

Attention is always ``torch.nn.functional.scaled_dot_product_attention`` (``_supports_sdpa``, so
``attn_implementation="sdpa"`` is accepted; no other implementation is used whatever is asked).
``save_pretrained`` also writes the model's code (:mod:`attnres.hf.remote_code`), so the folder
loads with ``trust_remote_code=True`` where attnres is not installed.

Not supported (each raises a clear error rather than computing something else): ``inputs_embeds``,
custom ``position_ids`` (positions are always counted over a row's real tokens), transformers'
own cache classes and ``output_attentions``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnres.hf.config import AttnResConfig
from attnres.hf.remote_code import write_remote_code
from attnres.model import Transformer
from attnres.model.cache import KVCache
from attnres.model.transformer import rope_tables

# transformers 5.24 renamed the cache keyword of ``forward`` and the cache field of model outputs
# from ``past_key_values`` to ``cache``. The wrappers accept either keyword and return the cache under
# the name the installed version reads back in ``generate``.
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


class HFKVCache(KVCache):
    """Our KV cache with what transformers' ``generate`` asks of a cache object."""

    is_compileable = False

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it is a linear-attention (constant-size) cache: never, here."""
        return [False] * self.k.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots written so far (padding included), which ``generate`` uses to slice new inputs."""
        return self.length

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep rows ``beam_idx`` (beam search picks which hypotheses continue)."""
        self.k = self.k.index_select(1, beam_idx.to(self.k.device))
        self.v = self.v.index_select(1, beam_idx.to(self.v.device))
        self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
        self.next_position = self.next_position.index_select(0, beam_idx.to(self.next_position.device))


class AttnResPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, weight init, checkpoint prefix."""

    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # every attention is F.scaled_dot_product_attention
    _no_split_modules = ["Transformer"]

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, plus the model's code and ``auto_map`` in ``config.json``
        (:func:`attnres.hf.remote_code.write_remote_code`), for ``trust_remote_code=True`` loading."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            write_remote_code(save_directory)

    def _set_gradient_checkpointing(
        self,
        enable: bool = True,
        gradient_checkpointing_func: Callable[..., Any] = checkpoint,
        every_n_layers: int = 1,
    ) -> None:
        """transformers' hook behind ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``
        (and their ``disable``): the wrapped model's own mechanism, in mode ``"block"``.

        ``"block"`` recomputes one Transformer layer at a time for variants without blocks (what
        transformers means by checkpointing a decoder layer) and one block of ``S`` sublayers for
        Block AttnRes; ``model.transformer.set_activation_checkpointing("sublayer")`` picks the
        other mode. The model calls ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
        itself, so only that function (and ``use_reentrant=False``) is accepted, and only
        ``every_n_layers=1``.
        """
        kwargs = getattr(gradient_checkpointing_func, "keywords", {})
        func = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
        ours = func is checkpoint and set(kwargs) <= {"use_reentrant"} and not kwargs.get("use_reentrant")
        if enable and not (ours and every_n_layers == 1):
            raise ValueError(
                "AttnRes models checkpoint with torch.utils.checkpoint(use_reentrant=False) and "
                "every_n_layers=1 only (no other activation_checkpointing_kwargs, no offload); "
                f"got {gradient_checkpointing_func!r}, every_n_layers={every_n_layers}"
            )
        for module in self.modules():
            if isinstance(module, Transformer):
                module.set_activation_checkpointing("block" if enable else "none")

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the wrapped model recomputes activations in the backward."""
        return any(m.activation_checkpointing != "none" for m in self.modules() if isinstance(m, Transformer))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this per module, children first. All of our initialisation is
        # Transformer.init_weights (one table, one place); transformers guards torch.nn.init while
        # this runs, so weights loaded from a checkpoint are left alone and only missing ones are
        # drawn. The RoPE tables are non-persistent buffers, never in a checkpoint: rebuild them.
        if isinstance(module, Transformer):
            module.init_weights()
            cfg = module.cfg
            cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)


def _expected_positions(attention_mask: Tensor | None, past: int, shape: torch.Size) -> Tensor:
    """Positions ``[B, T]`` the model uses: each row counts its own real tokens from 0."""
    if attention_mask is None:
        return torch.arange(past, past + shape[1]).expand(shape)
    real = attention_mask.long()
    return (real.cumsum(1) - 1).clamp(min=0)[:, -shape[1] :]


def _one_cache(past_key_values: Any, cache: Any) -> Any:
    """The cache passed under either of its names; both at once is ambiguous."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _check_unsupported(
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    past_key_values: Any,
    inputs_embeds: Tensor | None,
    kwargs: dict[str, Any],
) -> Tensor:
    """Raise for inputs the reference model cannot honour; return ``input_ids``."""
    if inputs_embeds is not None or input_ids is None:
        raise ValueError("AttnRes models take input_ids only (inputs_embeds is not supported)")
    if past_key_values is not None and not isinstance(past_key_values, KVCache):
        raise ValueError(
            f"past_key_values of type {type(past_key_values).__name__} is not supported; the AttnRes "
            "wrapper uses attnres.hf.HFKVCache, which generate() creates by itself"
        )
    if position_ids is not None:
        past = past_key_values.length if past_key_values is not None else 0
        expected = _expected_positions(attention_mask, past, input_ids.shape).to(position_ids.device)
        real = attention_mask[:, -input_ids.shape[1] :].bool() if attention_mask is not None else True
        if not bool(((position_ids == expected) | ~torch.as_tensor(real)).all()):
            raise ValueError(
                "custom position_ids are not supported; positions are always counted over each "
                "row's real (unpadded) tokens from 0"
            )
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported by the AttnRes wrapper")
    return input_ids


class AttnResModel(AttnResPreTrainedModel):
    """The base model: ``last_hidden_state`` is the final read after the final norm ``[B, T, d]``.

    With ``output_hidden_states`` (argument or config), ``hidden_states`` is the tuple of the
    ``n_layers`` layer inputs and the final read before the final norm (module docstring).

    It holds the whole reference ``Transformer`` (``self.transformer``) so that the checkpoint keys
    are the native ones; the LM head inside it is unused here (``AttnResForCausalLM`` uses it).
    """

    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.embed.weight"}

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__(config)
        self.transformer = Transformer(config.to_model_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embed = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``input_ids [B, T]`` -> ``last_hidden_state [B, T, d]`` (and ``hidden_states`` if asked).

        ``cache`` (transformers ≥ 5.24) and ``past_key_values`` (earlier) name the same argument.
        """
        past_key_values = _one_cache(past_key_values, cache)
        tokens = _check_unsupported(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, kwargs
        )
        B, T = tokens.shape
        cache, mask = past_key_values, None
        if attention_mask is not None and (cache is not None or not bool(attention_mask.all())):
            mask = attention_mask[:, -T:]  # generate passes the mask of the whole sequence so far
        if cache is None and mask is not None:
            # A padded batch: a cache used for this forward only masks the padding and counts
            # positions over real tokens, exactly as in cached decoding.
            param = self.transformer.lm_head.weight
            cache = KVCache(self.transformer.cfg, B, T, dtype=param.dtype, device=param.device)
            past_key_values = None
        want = kwargs.get("output_hidden_states")
        want = self.config.output_hidden_states if want is None else want
        layer_inputs: list[Tensor] | None = [] if want else None
        hidden = self.transformer.hidden(tokens, cache=cache, attention_mask=mask, layer_inputs=layer_inputs)
        return BaseModelOutputWithPast(
            last_hidden_state=self.transformer.norm(hidden),
            hidden_states=None if layer_inputs is None else (*layer_inputs, hidden),
            **{CACHE_FIELD: past_key_values},
        )


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    """Causal LM with ``generate`` support; logits equal ``Transformer.forward`` exactly."""

    _tied_weights_keys = {"model.transformer.lm_head.weight": "model.transformer.embed.weight"}

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__(config)
        self.model = AttnResModel(config)
        self.post_init()

    @property
    def transformer(self) -> Transformer:
        """The wrapped reference model (shares every parameter with this wrapper)."""
        return self.model.transformer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, T, vocab]`` (the last ``logits_to_keep`` positions if > 0) and, given
        ``labels [B, T]`` (unshifted, -100 ignored), the mean next-token loss. ``cache`` is
        ``past_key_values`` under its transformers ≥ 5.24 name; ``hidden_states`` as in
        :class:`AttnResModel`."""
        past_key_values = _one_cache(past_key_values, cache)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **{k: v for k, v in kwargs.items() if k.startswith("output_")},
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.transformer.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: past_key_values}
        )

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        # transformers would build its own DynamicCache here; ours is the model's KVCache, sized
        # as transformers sizes its static caches (every beam and returned sequence is a row).
        if model_kwargs.get(CACHE_FIELD) is not None or generation_config.use_cache is False:
            return
        copies = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        param = self.transformer.lm_head.weight
        model_kwargs[CACHE_FIELD] = HFKVCache(
            self.transformer.cfg,
            copies * batch_size,
            max_cache_length,
            dtype=param.dtype,
            device=param.device,
        )
