"""Hugging Face ``transformers`` integration: config, models, Auto registration, conversion.

Importing this package registers ``model_type="attnres"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so a saved model loads with plain transformers calls and no
``trust_remote_code``::

    import attnres.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained("out/hf")

A saved folder also carries the model's code (:mod:`attnres.hf.remote_code`), so where attnres is
not imported (or not installed) it loads with ``trust_remote_code=True``.

Needs the ``hf`` extra: ``pip install 'attnres[hf]'``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from attnres.hf.config import AttnResConfig
from attnres.hf.from_config import model_config_from_hf
from attnres.hf.modeling import AttnResForCausalLM, AttnResModel, AttnResPreTrainedModel, HFKVCache

AutoConfig.register(AttnResConfig.model_type, AttnResConfig, exist_ok=True)
AutoModel.register(AttnResConfig, AttnResModel, exist_ok=True)
AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)

__all__ = [
    "AttnResConfig",
    "AttnResForCausalLM",
    "AttnResModel",
    "AttnResPreTrainedModel",
    "HFKVCache",
    "model_config_from_hf",
]
