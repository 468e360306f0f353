"""lm-evaluation-harness as a real client: its command line on a converted folder, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import torch  # noqa: E402

from attnres.hf import AttnResForCausalLM  # noqa: E402

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "To be, or not", "choices": ["to be", "to see"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "nine"], "answer": 0},
    {"question": "Once upon a", "choices": ["time", "mattress"], "answer": 0},
]


def _task(root, docs: list[dict]) -> str:
    """A local multiple-choice task in ``root`` (a JSONL dataset and its YAML); returns its name."""
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "attnres_tiny_mc.yaml").write_text(
        "task: attnres_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return "attnres_tiny_mc"


def _loglikelihood(model: AttnResForCausalLM, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it), by our own model (byte tokens)."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits.double().log_softmax(-1)[0]
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


@pytest.mark.slow  # 13 s warm, 26 s on a first run (2 cores): lm-eval's imports and dataset builder
def test_lm_eval_cli_loglikelihoods_equal_our_model(tmp_path, hf_dir, no_attnres_env) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    name = _task(tasks, DOCS)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
        "--tasks",
        name,
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    # attnres unimportable: lm-eval runs the folder's own code, as it would on another machine.
    res = subprocess.run(cmd, env=no_attnres_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    (samples,) = out.glob(f"*/samples_{name}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == list(range(len(DOCS)))

    ours = AttnResForCausalLM.from_pretrained(hf_dir).eval()
    checked = 0
    for row in rows:
        doc = DOCS[row["doc_id"]]
        for i, choice in enumerate(doc["choices"]):
            args = row["arguments"][f"gen_args_{i}"]
            assert (args["arg_0"], args["arg_1"]) == (doc["question"], " " + choice)
            reported = float(row["filtered_resps"][i][0])
            assert reported == pytest.approx(_loglikelihood(ours, args["arg_0"], args["arg_1"]), abs=1e-4)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
