import os
from pathlib import Path

import pytest

# No hub access exists (or is wanted) in tests: every load must be from a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

#: a ``sitecustomize`` that makes ``attnres`` unimportable, however it is installed (path, editable)
_BLOCK_ATTNRES = """import sys


class _NoAttnRes:
    def find_spec(self, name, path=None, target=None):
        if name == "attnres" or name.startswith("attnres."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")


sys.meta_path.insert(0, _NoAttnRes())
"""


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted folder (``attnres convert --to-hf``'s code path) of a Block AttnRes model with
    random pseudo-queries, the byte tokenizer and ``seq_len=64``."""
    import dataclasses

    import torch

    from attnres.hf.convert import to_hf
    from attnres.model import ModelConfig, Transformer
    from attnres.residuals import ResidualConfig
    from attnres.storage.checkpoint import save_checkpoint
    from attnres.storage.config import TrainConfig
    from attnres.storage.tokenizer import ByteTokenizer

    root = tmp_path_factory.mktemp("hf-remote")
    cfg = ModelConfig(
        vocab_size=257,
        d_model=32,
        n_layers=2,
        n_heads=4,
        seq_len=64,
        residual=ResidualConfig("block", block_size=2),
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.residual.query.normal_()
    save_checkpoint(root / "run", model, dataclasses.replace(TrainConfig(), model=cfg), ByteTokenizer(), {})
    return to_hf(root / "run", root / "hf")


@pytest.fixture(scope="session")
def no_attnres_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a subprocess of this interpreter in which ``import attnres`` fails."""
    block = tmp_path_factory.mktemp("no-attnres")
    (block / "sitecustomize.py").write_text(_BLOCK_ATTNRES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(block), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
