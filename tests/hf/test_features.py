"""transformers features of the wrappers: hidden states, SDPA, PEFT, padded training, the tokenizer."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from attnres.hf import AttnResConfig, AttnResForCausalLM, AttnResModel  # noqa: E402

#: the README's LoRA line: our module names match none of PEFT's built-in mappings
LORA_TARGETS = ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]


def make_model(variant: str, n_layers: int = 3, **kw) -> AttnResForCausalLM:
    cfg = AttnResConfig(
        vocab_size=99,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        seq_len=32,
        residual={"variant": variant},
        **kw,
    )
    torch.manual_seed(0)
    model = AttnResForCausalLM(cfg).eval()
    if hasattr(model.transformer.residual, "query"):
        with torch.no_grad():
            model.transformer.residual.query.normal_(std=0.5)
    return model


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
@pytest.mark.parametrize("grad", [False, True], ids=["infer", "train"])
def test_hidden_states_are_the_layer_inputs_and_the_final_read(variant: str, grad: bool) -> None:
    model = make_model(variant)
    t = model.transformer
    seen: dict[str, list[torch.Tensor]] = {"layers": [], "norm": []}
    hooks = [t.norm.register_forward_pre_hook(lambda m, a: seen["norm"].append(a[0]))]
    for i in range(t.cfg.n_layers):
        hooks.append(t.sublayers[2 * i].register_forward_pre_hook(lambda m, a: seen["layers"].append(a[0])))
    x = torch.randint(0, 99, (2, 7))
    torch.set_grad_enabled(grad)  # the fast paths differ with and without gradients
    try:
        out = model(input_ids=x, output_hidden_states=True)
        for h in hooks:
            h.remove()
        plain = model(input_ids=x)
        base = AttnResModel.forward(model.model, input_ids=x).last_hidden_state
    finally:
        torch.set_grad_enabled(True)
    hs = out.hidden_states
    assert isinstance(hs, tuple) and len(hs) == t.cfg.n_layers + 1
    assert all(h.shape == (2, 7, 32) for h in hs)
    fused = not grad and variant != "prenorm"  # each read fused with the sublayer's pre-norm
    for i, (mine, fed) in enumerate(zip(hs[:-1], seen["layers"], strict=True)):  # what each attention read
        if fused:  # the sublayer was fed norm(read), computed in the read's pass
            torch.testing.assert_close(t.sublayers[2 * i].norm(mine), fed, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(mine, fed)
    assert torch.equal(hs[-1], seen["norm"][0])  # what the final norm is applied to
    assert torch.equal(t.norm(hs[-1]), base)
    if variant == "prenorm":
        assert torch.equal(hs[0], t.embed(x))
    assert torch.equal(out.logits, plain.logits)  # asking for them changes nothing
    assert plain.hidden_states is None


def test_hidden_states_from_the_config_and_with_padding() -> None:
    model = make_model("block", output_hidden_states=True)
    x = torch.randint(0, 99, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    out = model(input_ids=x, attention_mask=mask)
    assert len(out.hidden_states) == 4
    alone = model(input_ids=x[:1, 2:])
    torch.testing.assert_close(out.hidden_states[-1][0, 2:], alone.hidden_states[-1][0], rtol=0, atol=1e-5)


def test_sdpa_is_accepted_and_changes_nothing(tmp_path) -> None:
    model = make_model("block")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.config._attn_implementation == "sdpa"
    x = torch.randint(0, 99, (2, 7))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_padded_batch_trains_like_each_row_alone() -> None:
    """A padded batch (what Trainer feeds with a pad token) runs backward, with each row's gradient."""
    model = make_model("block").train()
    a, b = torch.randint(0, 99, (1, 7)), torch.randint(0, 99, (1, 4))
    ids = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    w = torch.randn(4, 99)
    (model(input_ids=ids, attention_mask=mask).logits[1, :4] * w).sum().backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (model(input_ids=b).logits[0] * w).sum().backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert padded.keys() == alone.keys()
    for name, grad in alone.items():
        torch.testing.assert_close(padded[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_trains_only_the_adapters() -> None:
    peft = pytest.importorskip("peft")
    model = make_model("full").train()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=LORA_TARGETS))
    x = torch.randint(0, 99, (2, 7))
    lora(input_ids=x, labels=x).loss.backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == with_grad
    adapted = {n.rsplit(".", 1)[0] for n, _ in lora.named_modules() if n.endswith("lora_A")}
    assert len(adapted) == len(LORA_TARGETS) * 3  # every attention and MLP projection of 3 layers


def test_converted_tokenizer_pads_truncates_and_marks_bos_eos(hf_dir) -> None:
    tok = AutoTokenizer.from_pretrained(hf_dir)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == eot == 256
    assert tok.model_max_length == 64
    assert tok("To be").input_ids == list(b"To be")  # no BOS is prepended
    assert len(tok("x" * 100, truncation=True).input_ids) == 64
    batch = tok(["To be", "or not to be"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1].item() == eot and batch.attention_mask[0].sum().item() == 5
    cfg = AutoModelForCausalLM.from_pretrained(hf_dir).config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (eot, eot, eot)
