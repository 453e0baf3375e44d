"""A training checkpoint folder: what a restart needs to continue exactly where training stood.

One folder per checkpoint: `weights.safetensors` (every parameter any stage so far trained, by
name), `optimizer.pt` (the current stage's AdamW state keyed by parameter name, read back with
weights_only=True) and `state.json` (format, stage index, next step, guard state). DDP and FSDP
runs write and read the same folder (components/training/fsdp.py gathers and scatters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.training.fsdp import load_parameters

WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = 2
"""2: the optimizer state is keyed by parameter name (torch.distributed.checkpoint's full
state dict), so DDP and FSDP runs write and read the same checkpoints."""


class CheckpointFormatError(ValueError):
    """A checkpoint folder this trainer cannot read (missing file, other format)."""


@dataclass(frozen=True, slots=True)
class TrainState:
    """Where training stands: the stage, the next optimizer step, and what resumes it."""

    stage_index: int
    next_step: int
    optimizer_state: dict[str, Any]
    guard_state: dict[str, Any]


def save_train_state(folder: Path, *, weights: dict[str, torch.Tensor], state: TrainState) -> None:
    """Write a checkpoint folder (see the module docstring) from gathered full tensors."""
    save_file(weights, str(folder / WEIGHTS_FILE))
    torch.save(state.optimizer_state, folder / OPTIMIZER_FILE)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "stage_index": state.stage_index,
        "next_step": state.next_step,
        "guard": state.guard_state,
    }
    (folder / STATE_FILE).write_text(json.dumps(payload))


def check_format(folder: Path, payload: dict[str, Any]) -> None:
    """Raise CheckpointFormatError unless `payload` (a state.json) is this trainer's format."""
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointFormatError(
            f"checkpoint {folder} has format {payload.get('format')!r}; this trainer reads "
            f"format {CHECKPOINT_FORMAT} (start a new run.root or train.storage_path)"
        )


def load_train_state(folder: Path, model: torch.nn.Module) -> TrainState:
    """Restore a checkpoint folder's weights into `model` (sharded or not) and return the
    state. Every worker calls it."""
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (folder / name).exists():
            raise CheckpointFormatError(f"checkpoint {folder} lacks {name}")
    payload = json.loads((folder / STATE_FILE).read_text())
    check_format(folder, payload)
    load_parameters(model, load_file(str(folder / WEIGHTS_FILE)), source=f"checkpoint {folder}")
    optimizer_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    return TrainState(
        payload["stage_index"], payload["next_step"], optimizer_state, payload["guard"]
    )
