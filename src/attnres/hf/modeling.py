"""transformers wrappers around the reference :class:`attnres.model.Transformer`.

The wrappers hold one ``Transformer`` and call its own methods, so the HF logits are the native
logits, operation for operation. Checkpoint keys are the native keys under ``model.transformer.``.

Not supported (each raises a clear error rather than computing something else): padded batches
(``attention_mask`` with zeros), ``inputs_embeds``, custom ``position_ids``, ``past_key_values``,
``output_attentions`` and ``output_hidden_states``. Generation recomputes the whole prefix at every
step (``use_cache=False``): correct, and fine for the small models this project trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnres.hf.config import AttnResConfig
from attnres.model import Transformer
from attnres.model.transformer import rope_tables


class AttnResPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing: config class, weight init, checkpoint prefix."""

    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Transformer"]

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
    if past_key_values is not None:
        raise ValueError(
            "past_key_values is not supported: the AttnRes HF wrapper recomputes the prefix; "
            "call generate(..., use_cache=False) (the default in AttnResConfig)"
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "padded batches are not supported (attention_mask has zeros): the reference model is "
            "causal over the full sequence; generate or train on unpadded sequences of equal length"
        )
    if position_ids is not None:
        expected = torch.arange(input_ids.shape[1], device=position_ids.device)
        if not bool((position_ids == expected).all()):
            raise ValueError("custom position_ids are not supported; positions are always 0 … T-1")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"{flag}=True is not supported by the AttnRes wrapper")
    return input_ids


class AttnResModel(AttnResPreTrainedModel):
    """The base model: ``last_hidden_state`` is the final read after the final norm ``[B, T, d]``.

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
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``input_ids [B, T]`` -> ``last_hidden_state [B, T, d]``."""
        tokens = _check_unsupported(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, kwargs
        )
        hidden = self.transformer.norm(self.transformer.hidden(tokens))
        return BaseModelOutputWithPast(last_hidden_state=hidden)


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
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, T, vocab]`` (the last ``logits_to_keep`` positions if > 0) and, given
        ``labels [B, T]`` (unshifted, -100 ignored), the mean next-token loss."""
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **{k: v for k, v in kwargs.items() if k.startswith("output_")},
        ).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.transformer.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
