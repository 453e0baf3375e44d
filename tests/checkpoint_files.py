"""Training checkpoint folders written by hand (for export tests and benchmarks that need a
checkpoint without running a training): the current format through the product's own writer, and
format 2 (full tensors in safetensors), which the trainer and export still read."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.training.checkpoint_state import (
    LEGACY_OPTIMIZER_FILE,
    LEGACY_WEIGHTS_FILE,
    MODEL_PREFIX,
    TrainState,
    write_state_file,
)

STATE = TrainState(stage_index=2, next_step=4, guard_state={"recent_norms": [], "skips": 0})


def write_checkpoint(folder: Path, weights: dict[str, torch.Tensor], *, ema=None) -> Path:
    """A format-3 checkpoint (DCP, one process) holding `weights` (and EMA shadows)."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    entries = {f"{MODEL_PREFIX}{name}": value.contiguous() for name, value in weights.items()}
    entries |= {f"ema.{name}": value.contiguous() for name, value in (ema or {}).items()}
    dcp.save(entries, checkpoint_id=folder, no_dist=True)
    write_state_file(folder, STATE)
    return folder


def write_legacy_checkpoint(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A format-2 checkpoint: full tensors + an empty name-keyed AdamW state."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: value.contiguous() for name, value in weights.items()},
        str(folder / LEGACY_WEIGHTS_FILE),
    )
    torch.save({"state": {}, "param_groups": []}, folder / LEGACY_OPTIMIZER_FILE)
    state = {"format": 2, "stage_index": 2, "next_step": 4, "guard": STATE.guard_state}
    (folder / "state.json").write_text(json.dumps(state))
    return folder
