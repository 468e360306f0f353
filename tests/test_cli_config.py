"""Configs as files and the config part of the command line: ``--config`` (JSON or YAML) under the
flags, ``--print-config``, ``--help`` built from the dataclasses' docstrings, "did you mean"."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from attnres.cli import main
from attnres.configs import describe_keys, field_docs, valid_keys
from attnres.residuals import options_class, variant_names
from attnres.storage.config import OptimConfig, TrainConfig
from attnres.train import get_preset
from attnres.train.presets import PRESETS


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """``attnres argv``: exit status (0 when it returns), stdout, stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _printed(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--print-config")
    assert code == 0, err
    return json.loads(out)


def test_a_saved_config_reproduces_the_run(tmp_path, cache_dir, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [f"--data.cache_dir={cache_dir}", "--train.steps=4", "--model.residual.variant=full"]
    assert _run(capsys, "train", "--preset", "tiny", "--out", str(a), *flags)[0] == 0
    assert _run(capsys, "train", "--config", str(a / "config.json"), "--out", str(b))[0] == 0
    assert json.loads((b / "config.json").read_text()) == json.loads((a / "config.json").read_text())

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(b) == losses(a) and len(losses(a)) == 4


def test_preset_then_file_then_flags(tmp_path, capsys) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "partial.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 2\nmodel:\n  residual: {variant: full}\n")
    out = str(tmp_path / "never")
    cfg = _printed(
        capsys, "train", "--preset", "tiny", "--config", str(path), "--train.steps=9", "--out", out
    )
    assert cfg["train"]["steps"] == 9  # the flag wins over the file
    assert cfg["train"]["batch_size"] == 2 and cfg["model"]["residual"]["variant"] == "full"  # the file
    assert cfg["model"]["d_model"] == get_preset("tiny").model.d_model  # the preset, where the file is silent
    default = _printed(capsys, "train", "--config", str(path), "--out", out)
    assert default["model"]["d_model"] == get_preset("quick").model.d_model  # no --preset: quick
    assert not (tmp_path / "never").exists()  # --print-config trains nothing
    # compare builds its shared config the same way
    shared = _printed(capsys, "compare", "--preset", "tiny", "--config", str(path), "--out", out)
    assert shared["train"]["steps"] == 7 and shared["model"]["d_model"] == get_preset("tiny").model.d_model


def test_a_json_file_and_resume_from_its_own_config(tmp_path, cache_dir, capsys) -> None:
    run = tmp_path / "run"
    flags = [f"--data.cache_dir={cache_dir}", "--train.steps=2"]
    assert _run(capsys, "train", "--preset", "tiny", "--out", str(run), *flags)[0] == 0
    saved = run / "config.json"
    code, _, err = _run(
        capsys, "train", "--out", str(run), "--resume", "--config", str(saved), "--train.steps=3"
    )
    assert code == 0, err
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({"optim": {"lr": 0.5}, "train": {"steps": 4}}))
    code, _, err = _run(capsys, "train", "--out", str(run), "--resume", "--config", str(changed))
    assert code == 2 and "cannot change optim.lr" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "{not json", "bad.json is not valid JSON"),
        ("list.json", "[1, 2]", "list.json must hold a mapping of config sections, got list"),
        (
            "typo.json",
            '{"train": {"stesp": 3}}',
            "--config {path}: unknown config key 'train.stesp'; did you mean train.steps",
        ),
        ("type.json", '{"train": {"steps": "many"}}', "train.steps expects an int, got 'many'"),
        ("bad.yaml", "train: [", "bad.yaml is not valid YAML"),
        ("missing.json", None, "No such file or directory"),
    ],
)
def test_a_bad_config_file_is_one_line(
    tmp_path, capsys, name: str, content: str | None, message: str
) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, _, err = _run(capsys, "train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.startswith("attnres train: error: ") and err.count("\n") == 1
    assert message.format(path=path) in err


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ModuleNotFoundError
    path = tmp_path / "c.yml"
    path.write_text("train: {steps: 3}\n")
    code, _, err = _run(capsys, "train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and "needs PyYAML: pip install 'attnres[yaml]'" in err


def test_an_unknown_key_suggests_the_nearest_not_all(capsys, tmp_path) -> None:
    out = str(tmp_path / "run")
    for flag, suggestion in [
        ("--train.lr=1", "did you mean optim.lr"),  # the same name in another section
        ("--train.stesp=3", "did you mean train.steps"),  # a typo
        ("--model.residual.blocksize=2", "did you mean model.residual.block_size"),
        ("--trian.steps=3", "did you mean train.steps"),
    ]:
        code, _, err = _run(capsys, "train", "--preset", "tiny", "--out", out, flag)
        assert code == 2 and suggestion in err, err
        assert "parallel.attnres_cache" not in err and err.count("\n") == 1  # not every key
    code, _, err = _run(capsys, "train", "--out", out, "--nothing.close=1")
    assert code == 2 and "keys start with: model., data., optim., schedule., train., parallel." in err


def test_help_lists_every_key_with_its_type_default_and_doc_and_the_presets(capsys) -> None:
    for verb in ("train", "compare"):
        code, out, _ = _run(capsys, verb, "--help")
        assert code == 0
        for key in describe_keys(get_preset("quick")):
            assert f"  {key.key} ({key.type}, default {key.default!r})\n" in out, key.key
        for name, fn in PRESETS.items():
            assert f"  {name}: {fn.__doc__.split('.')[0]}" in out
    assert "  optim.lr (float, default 0.003)\n      peak AdamW learning rate.\n" in out
    assert "  model.residual.block_size (int | None, default 4)\n" in out
    assert "  train.logger (str, default 'none')\n" in out
    for variant in variant_names():  # every variant's options, not only the preset's variant's
        assert f"\n  {variant}:" in out
    assert "  hc:\n    n_streams (int, default 4)\n      " in out


def test_compare_gives_each_variant_the_residual_options_it_has(capsys, tmp_path) -> None:
    out = str(tmp_path / "cmp")
    code, _, err = _run(
        capsys, "compare", "--variants", "block,full", "--out", out, "--model.residual.n_streams=2"
    )
    assert code == 2 and "model.residual.n_streams is an option of none of the variants compared" in err
    assert "it is one of hc, mhc, mhc_lite" in err and err.count("\n") == 1


def test_every_config_key_has_a_doc_from_its_docstring() -> None:
    keys = describe_keys(TrainConfig())
    assert [k.key for k in keys] == valid_keys(TrainConfig)
    assert [k.key for k in keys if not k.doc] == []  # a new field needs its Attributes: entry
    docs = field_docs(OptimConfig)
    assert docs["beta1"] == docs["beta2"] == "AdamW betas."  # "beta1, beta2: ..." documents both
    for variant in variant_names():  # each variant's options, its own and inherited, are documented
        options = options_class(variant)
        assert set(field_docs(options)) == {f.name for f in dataclasses.fields(options)}, variant
    assert field_docs(options_class("swa"))["window"].startswith("the number of most recent sublayer outputs")
    assert field_docs(options_class("highway"))["gate_bias"].endswith("(paper range -1 … -3).")
    grouped = field_docs(_Grouped)  # entries under the group headings after Attributes:
    assert set(grouped) == {"window", "n_streams"} and grouped["window"] == "the window."
    assert "Multi-stream options" not in grouped["window"]  # a heading ends the entry before it


@dataclasses.dataclass
class _Grouped:
    """Entries under headings.

    Attributes:
        window: the window.

    Multi-stream options:
        n_streams: residual streams.
    """

    window: int = 8
    n_streams: int = 4
