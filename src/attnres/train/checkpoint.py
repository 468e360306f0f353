"""The trainer state of a checkpoint (``trainer_state.pt``): what ``--resume`` restores besides the
weights. The rest of a checkpoint is :mod:`attnres.storage.checkpoint`, which writes this file
as an opaque dict; this module reads it back and checks that it is one ``attnres train`` wrote.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from attnres.storage.checkpoint import CheckpointError, checkpoint_path, verified

#: what trainer_state.pt holds for ``--resume``
TRAINER_STATE_KEYS = ("step", "optimizer", "rng_cpu")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Step, optimiser and RNG states saved next to the weights, loaded without running any code.

    Raises:
        CheckpointError: the file is corrupted, holds objects other than tensors and plain data
            (refused unread: a pickle can run code), or lacks what ``--resume`` needs.
    """
    p = checkpoint_path(path)
    state_file = verified(p, "trainer_state.pt")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line]  # an object, not plain data
        if refused:
            raise CheckpointError(
                f"refused to load {state_file}: it holds objects other than tensors and plain data, "
                f"which could run code when unpickled ({refused[0].strip()}); it was not written by "
                "attnres train: do not resume a run directory you do not trust with another tool"
            ) from None
        raise CheckpointError(f"{state_file} is corrupted or truncated (not a torch file)") from None
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler fail in any way (IndexError, KeyError …)
        raise CheckpointError(f"{state_file} is corrupted or truncated ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and state.get("weights_only"):
        raise CheckpointError(
            f"{p} holds weights only (made by attnres convert --from-hf): it has no optimiser state to "
            "resume; sample or convert it, or train a new run"
        )
    if not isinstance(state, dict) or any(k not in state for k in TRAINER_STATE_KEYS):
        raise CheckpointError(
            f"{state_file} is not an attnres trainer state: expected a dict with "
            f"{', '.join(TRAINER_STATE_KEYS)}"
        )
    return state
