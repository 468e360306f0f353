"""``attnres bench train --peer DIR``: a nanoGPT-style checkout timed beside our arms.

The peer here is a minimal nanoGPT-like Block AttnRes model written by this test into ``tmp_path``
(no public code): ``model.py`` with ``GPTConfig`` and ``GPT``, and a sibling ``attnres.py`` whose
name shadows this package while the peer loads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import attnres
from attnres.bench.peer import PeerError, PeerSpec, load, parse_overrides
from attnres.bench.train import SIZES, VOCAB, _batch
from attnres.cli import main

SIBLING = '''
import torch
from torch.nn import functional as F


def depth_mix(sources, query):
    """Softmax over depth of RMS-normed keys, weighted sum of the raw sources."""
    v = torch.stack(sources)
    k = F.rms_norm(v, v.shape[-1:])
    w = torch.einsum("d,nbtd->nbt", query, k).softmax(0)
    return torch.einsum("nbt,nbtd->btd", w, v)
'''

MODEL = """
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from attnres import depth_mix  # the sibling attnres.py


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 100
    n_layer: int = 3
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.1
    bias: bool = True
    attnres_variant: str = "none"
    attnres_block_size: int = 4


class Sublayer(nn.Module):
    def __init__(self, cfg, attn):
        super().__init__()
        d, self.attn, self.n_head = cfg.n_embd, attn, cfg.n_head
        self.norm = nn.LayerNorm(d, bias=cfg.bias)
        self.inp = nn.Linear(d, 3 * d if attn else 4 * d, bias=cfg.bias)
        self.out = nn.Linear(d if attn else 4 * d, d, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.inp(self.norm(x))
        if self.attn:
            b, t, _ = h.shape
            q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in h.chunk(3, dim=-1))
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        else:
            h = F.gelu(h)
        return self.drop(self.out(h))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, n = config.n_embd, 2 * config.n_layer
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.sublayers = nn.ModuleList(Sublayer(config, attn=i % 2 == 0) for i in range(n))
        self.queries = nn.Parameter(torch.zeros(n + 1, d))
        self.ln_f = nn.LayerNorm(d, bias=config.bias)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        size = {"block": self.config.attnres_block_size, "full": 1}[self.config.attnres_variant]
        blocks, partial = [x], None
        for i, f in enumerate(self.sublayers):
            out = f(depth_mix(blocks + ([] if partial is None else [partial]), self.queries[i]))
            partial = out if partial is None else partial + out
            if (i + 1) % size == 0:
                blocks, partial = blocks + [partial], None
        x = self.ln_f(depth_mix(blocks + ([] if partial is None else [partial]), self.queries[-1]))
        if targets is None:
            return self.lm_head(x[:, -1:]), None  # nanoGPT: the last position only
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
"""


def write_peer(root: Path, name: str = "fakegpt", model: str = MODEL, sibling: bool = True) -> Path:
    peer = root / name
    peer.mkdir()
    (peer / "model.py").write_text(model)
    if sibling:
        (peer / "attnres.py").write_text(SIBLING)
    return peer


def test_peer_arm_beside_ours(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    peer = write_peer(tmp_path)
    ours = sys.modules["attnres"]
    main(["bench", "train", "--size", "tiny", "--variants", "block", "--impls", "auto", "--repeats", "1",
          "--peer", str(peer), "--json"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert [r["arm"] for r in result["rows"]] == ["prenorm", "block[auto]", "peer:fakegpt"]
    row = result["rows"][-1]
    assert row["step_ms"] > 0 and row["forward_ms"] > 0 and row["memory_mb"] > 0
    assert row["ratio_vs_prenorm"] == pytest.approx(row["step_ms"] / result["rows"][0]["step_ms"])
    assert any(line.startswith("peer:fakegpt ") for line in out)  # a table row like the others
    shape = SIZES["tiny"]
    assert result["peer"]["config"] == {
        "n_embd": shape["d_model"], "n_layer": shape["n_layers"], "n_head": shape["n_heads"],
        "block_size": shape["seq_len"], "vocab_size": VOCAB, "dropout": 0.0, "bias": False,
        "attnres_variant": "block", "attnres_block_size": 1,  # ceil(4 sublayers / 8)
    }  # fmt: skip
    assert result["peer"]["notes"] == [] and result["peer"]["params"] > 0
    assert result["peer"]["prenorm_params"] > 0
    # the peer's sibling attnres.py shadowed this package only while model.py loaded
    assert str(peer) not in sys.path and sys.modules["attnres"] is ours is attnres


def test_peer_pairwise_runs_in_a_child(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    peer = write_peer(tmp_path)
    main(["bench", "train", "--size", "tiny", "--variants", "prenorm", "--repeats", "1", "--pairwise",
          "--peer", str(peer), "--peer-config", "attnres_variant=full", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["arm"] for r in result["rows"]] == ["prenorm", "peer:fakegpt"]
    assert result["peer"]["config"]["attnres_variant"] == "full"
    assert result["peer"]["config"]["attnres_block_size"] == 1


def test_fields_the_config_lacks_are_dropped_with_a_note(tmp_path: Path) -> None:
    model = MODEL.replace("    n_head: int = 2\n", "").replace("cfg.n_head", "2")
    model = model.replace("    attnres_block_size: int = 4\n", "    attnres_num_blocks: int = 2\n")
    model = model.replace("self.config.attnres_block_size", "2")
    path_before, modules_before = list(sys.path), set(sys.modules)
    peer = load(PeerSpec(str(write_peer(tmp_path, model=model))), SIZES["small"], VOCAB)
    assert sys.path == path_before
    assert set(sys.modules) - modules_before == {peer.gpt.__module__}  # the unique name only
    assert sys.modules["attnres"] is attnres
    assert "n_head" not in peer.applied
    assert peer.applied["attnres_num_blocks"] == 8  # 16 sublayers in blocks of 2, as our block arm
    assert len(peer.notes) == 1 and "no field for n_heads=4" in peer.notes[0]


def test_a_plain_config_class_is_read_from_its_default_instance(tmp_path: Path) -> None:
    plain = (
        "class GPTConfig:\n"
        "    def __init__(self, **kw):\n"
        "        self.n_embd = kw.pop('n_embd', 16)\n"
        "        self.n_layer = kw.pop('n_layer', 1)\n"
        "        self.attn_res_block_size = kw.pop('attn_res_block_size', 1)\n"
        "        for k, v in kw.items():\n"
        "            setattr(self, k, v)\n"
    )
    model = MODEL.split("@dataclass")[0] + plain + MODEL.split("    attnres_block_size: int = 4\n")[1]
    peer = load(PeerSpec(str(write_peer(tmp_path, model=model)), (("mine", 3),)), SIZES["small"], VOCAB)
    assert peer.applied == {"n_embd": 128, "n_layer": 8, "attn_res_block_size": 1, "mine": 3}
    assert peer.config.attn_res_block_size == 1 and peer.config.mine == 3
    assert any("no field for n_heads" in n for n in peer.notes)
    assert any("no field for vocab_size" in n for n in peer.notes)
    assert any("mine: not a field" in n for n in peer.notes)


def test_overrides_parse_as_literals() -> None:
    assert parse_overrides(["a=1", "b=full", "c=(1, 2)", "d='x'"]) == (("a", 1), ("b", "full"), ("c", (1, 2)),
                                                                       ("d", "x"))  # fmt: skip
    with pytest.raises(PeerError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def check_errors(peer: Path, match: str) -> None:
    with pytest.raises(PeerError, match=match):
        loaded = load(PeerSpec(str(peer)), SIZES["tiny"], VOCAB)
        loaded.check(loaded.build(), *_batch(SIZES["tiny"]), VOCAB)


def test_contract_errors(tmp_path: Path) -> None:
    check_errors(tmp_path / "nowhere", "no such directory")
    nested = tmp_path / "repo"
    nested.mkdir()
    write_peer(nested, "examples")
    check_errors(nested, "no model.py in it.*model.py files below it: examples")
    check_errors(write_peer(tmp_path, "nogpt", MODEL.replace("class GPT(", "class Other(")), "defines no GPT")
    check_errors(write_peer(tmp_path, "noimport", sibling=False), "importing .* failed .*depth_mix")
    one_arg = MODEL.replace("def forward(self, idx, targets=None)", "def forward(self, idx)")
    check_errors(write_peer(tmp_path, "onearg", one_arg), r"forward\(self, idx\) is not nanoGPT's")
    no_vocab = MODEL.replace("    vocab_size: int = 100\n", "").replace("config.vocab_size", "100")
    check_errors(write_peer(tmp_path, "novocab", no_vocab), "failed .*IndexError.*no field for vocab_size")
    wide = MODEL.replace("nn.Linear(d, config.vocab_size", "nn.Linear(d, 300")
    check_errors(write_peer(tmp_path, "wide", wide), r"logits have shape \(2, 16, 300\), expected "
                 r"\(batch, seq_len, vocab\) = \(2, 16, 256\)")  # fmt: skip
    broken = MODEL.replace('{"block": self.config.attnres_block_size, "full": 1}', "{}")
    check_errors(write_peer(tmp_path, "broken", broken), r"GPT.forward\(idx, targets\) failed .*KeyError")
    only_logits = MODEL.replace("return logits, F.cross_entropy", "return F.cross_entropy")
    check_errors(write_peer(tmp_path, "onlyloss", only_logits), r"returned Tensor, not \(logits, loss\)")
