"""Self-contained folders: the remote code written by save_pretrained, loaded where attnres is not."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.dynamic_module_utils import check_imports, get_relative_import_files  # noqa: E402

from attnres.hf import AttnResForCausalLM  # noqa: E402
from attnres.hf.remote_code import AUTO_MAP, ENTRY, KERNEL_STUBS, bundle_sources, flat_name  # noqa: E402
from attnres.ops.dispatch import use_kernels  # noqa: E402

PROMPT = b"To be, or not"


def _imports(text: str) -> set[str]:
    """Absolute module names imported anywhere in ``text`` (function bodies and try blocks too)."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_bundle_is_generated_from_the_package_and_imports_no_kernels(tmp_path) -> None:
    files = bundle_sources()
    for name, text in files.items():
        top = {n.split(".")[0] for n in _imports(text)}
        assert "attnres" not in top, name  # every package import is rewritten to a relative one
        assert not top & {"triton", "ninja"}, name
        assert "cpp_extension" not in text, name
    # One source of truth: a bundled module is its package source with only the imports rewritten.
    import attnres.ops.fused as fused

    bundled = files["ops_fused.py"]
    assert bundled.startswith("# Generated from attnres/ops/fused.py")
    assert bundled.count("\n") == Path(fused.__file__).read_text().count("\n") + 1
    assert "from .ops_dispatch import kernels_for" in bundled
    assert "from . import ops_triton as triton_ops" in bundled
    for module, stub in KERNEL_STUBS.items():
        assert files[flat_name(module) + ".py"] == stub
    # transformers copies exactly the files it finds by following relative imports from the entry.
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    entry = tmp_path / f"{ENTRY}.py"
    reached = {Path(f).name for f in get_relative_import_files(entry)}
    assert reached | {entry.name} == set(files)
    check_imports(entry)  # every absolute import of the entry file is installed


def test_save_pretrained_writes_the_code_and_in_process_loading_still_needs_none(tmp_path) -> None:
    from attnres.hf import AttnResConfig

    cfg = AttnResConfig(vocab_size=99, d_model=32, n_layers=2, residual={"variant": "full"})
    torch.manual_seed(0)
    model = AttnResForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP
    assert set(bundle_sources()) <= {p.name for p in tmp_path.glob("*.py")}
    # In a process that imported attnres.hf the registered classes load it, no remote code.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AttnResForCausalLM
    x = torch.randint(0, 99, (2, 7))
    assert torch.equal(loaded(x).logits, model(x).logits)


_FRESH = r"""
import json, sys
import torch

try:
    import attnres  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("attnres is importable in the fresh process")
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
from transformers import Trainer, TrainingArguments, pipeline

d, out = sys.argv[1], sys.argv[2]
report = {}
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
report["class"] = type(model).__module__ + "." + type(model).__name__
ids = torch.tensor([list(b"To be, or not")])
torch.save({"logits": model(ids).logits.detach()}, out + "/logits.pt")

gen = pipeline("text-generation", model=d, trust_remote_code=True)
report["generated"] = gen("To be", max_new_tokens=6, min_new_tokens=6, do_sample=False)[0]["generated_text"]

# Trainer on padded batches, with the tokenizer's own pad token (nothing set by hand).
texts = ["To be, or not to be", "that is", "the question", "Whether 'tis nobler in the mind"]
data = [tok(t, truncation=True) for t in texts]
args = TrainingArguments(
    output_dir=out + "/trainer", max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
    save_strategy="no", logging_steps=1,
)
collator = DataCollatorForLanguageModeling(tok, mlm=False)
trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True), args=args,
                  train_dataset=data, data_collator=collator)
result = trainer.train()
report["trainer_steps"], report["trainer_loss"] = result.global_step, result.training_loss

# LoRA through PEFT, with the target_modules line of the README.
from peft import LoraConfig, get_peft_model

lora = get_peft_model(
    AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True),
    LoraConfig(r=4, target_modules=["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]),
)
lora(input_ids=ids, labels=ids).loss.backward()
grads = [n for n, p in lora.named_parameters() if p.grad is not None]
report["lora_grads"] = len(grads)
report["lora_grads_all_lora"] = all("lora_" in n for n in grads)
report["lora_trainable_all_lora"] = all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)

# A model loaded with remote code saves a folder that loads again the same way.
model.save_pretrained(out + "/resaved")
again = AutoModelForCausalLM.from_pretrained(out + "/resaved", trust_remote_code=True).eval()
report["resaved_equal"] = torch.equal(again(ids).logits, model(ids).logits)
print(json.dumps(report))
"""


def test_fresh_process_without_attnres_loads_generates_trains_and_fine_tunes(
    tmp_path, hf_dir, no_attnres_env
) -> None:
    pytest.importorskip("peft")
    res = subprocess.run(
        [sys.executable, "-c", _FRESH, str(hf_dir), str(tmp_path)],
        env=no_attnres_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith(
        ".AttnResForCausalLM"
    )
    ours = AttnResForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([list(PROMPT)])
    remote = torch.load(tmp_path / "logits.pt")["logits"]
    with use_kernels("torch"):  # the copy has the PyTorch-ops paths only: the same ops, bit for bit
        assert torch.equal(remote, ours(ids).logits)
    torch.testing.assert_close(remote, ours(ids).logits, rtol=0, atol=1e-6)  # any kernels here
    # the same greedy continuation as our own generate, token for token
    expected = ours.generate(
        torch.tensor([list(b"To be")]), max_new_tokens=6, min_new_tokens=6, do_sample=False
    )
    assert report["generated"] == AutoTokenizer.from_pretrained(hf_dir).decode(expected[0])
    assert report["trainer_steps"] == 2 and report["trainer_loss"] == report["trainer_loss"]  # not NaN
    assert report["lora_grads"] > 0 and report["lora_grads_all_lora"] and report["lora_trainable_all_lora"]
    assert report["resaved_equal"]
