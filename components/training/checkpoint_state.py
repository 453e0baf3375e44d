"""A training checkpoint folder: what a restart needs to continue exactly where training stood.

Format 3 (written now), one folder per checkpoint:
  state.json           format, stage index, next step, guard state, batch layout (rank 0 writes it)
  .metadata            torch.distributed.checkpoint's index of every entry and its chunks
  __<rank>_0.distcp    each worker's own pieces (components/training/distributed_checkpoint.py)
Its entries are `model.<param>` (every parameter any stage so far trained), `optim.<param>.<key>`
(the current stage's AdamW state) and, with EMA on, `ema.<param>`. A checkpoint written by N
workers is read by M: each reads the pieces its own shards cover.

Format 2 (read, never written): `weights.safetensors` (full tensors by name) and `optimizer.pt`
(the AdamW state keyed by parameter name, read with weights_only=True). Anything older is refused
with a message.

The batch layout is the run's data-parallel shape (workers x accumulation steps): a step's
micro-batches and random draws are keyed by it, so a resume on another number of workers runs
the same micro-batches split differently (components/training/loop.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
CHECKPOINT_FORMAT = 3
"""3: torch.distributed.checkpoint shards per worker (resharded on load) + the batch layout."""
READ_FORMATS = (2, 3)
LEGACY_WEIGHTS_FILE = "weights.safetensors"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
DCP_METADATA_FILE = ".metadata"
MODEL_PREFIX = "model."
EMA_PREFIX = "ema."
OPTIMIZER_PREFIX = "optim."


class CheckpointFormatError(ValueError):
    """A checkpoint folder this trainer cannot read (missing file, other format)."""


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """A run's data-parallel shape: `workers` x `accumulation_steps` micro-batch slots per step.

    Slot (virtual rank r, micro-batch m) always reads the same rows and draws the same noise;
    `slots_of` splits the slots over however many workers run now."""

    workers: int
    accumulation_steps: int

    @property
    def num_slots(self) -> int:
        return self.workers * self.accumulation_steps

    def slots_of(self, rank: int, world: int) -> list[tuple[int, int]]:
        """(virtual rank, micro-batch) of the slots worker `rank` of `world` runs, in order."""
        if self.num_slots % world:
            raise ValueError(
                f"this training's steps are {self.workers} workers x {self.accumulation_steps} "
                f"accumulation steps = {self.num_slots} micro-batches; {world} workers cannot "
                f"split them evenly (run on a number of workers that divides {self.num_slots})"
            )
        per_worker = self.num_slots // world
        slots = range(rank * per_worker, (rank + 1) * per_worker)
        return [divmod(slot, self.accumulation_steps) for slot in slots]

    def to_json(self) -> dict[str, int]:
        return {"workers": self.workers, "accumulation_steps": self.accumulation_steps}


@dataclass(frozen=True, slots=True)
class TrainState:
    """Where training stands: the stage, the next optimizer step, and what resumes it."""

    stage_index: int
    next_step: int
    guard_state: dict[str, Any]
    layout: BatchLayout | None = None
    """None in a format-2 checkpoint (it predates layouts: resume on its own workers)."""
    folder: Path | None = None
    """The checkpoint folder the state was read from (None for one being written)."""
    format: int = CHECKPOINT_FORMAT


def write_state_file(folder: Path, state: TrainState) -> None:
    """Write state.json (temp file + rename: a reader never sees half of it)."""
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "stage_index": state.stage_index,
        "next_step": state.next_step,
        "guard": state.guard_state,
    }
    if state.layout is not None:
        payload["layout"] = state.layout.to_json()
    staging = folder / f".{STATE_FILE}.tmp"
    staging.write_text(json.dumps(payload))
    os.replace(staging, folder / STATE_FILE)


def check_format(folder: Path | str, payload: dict[str, Any]) -> None:
    """Raise CheckpointFormatError unless `payload` (a state.json) is a format this reads."""
    if payload.get("format") not in READ_FORMATS:
        raise CheckpointFormatError(
            f"checkpoint {folder} has format {payload.get('format')!r}; this trainer reads "
            f"formats {', '.join(map(str, READ_FORMATS))} (start a new run.root or "
            "train.storage_path)"
        )


def read_train_state(folder: Path) -> TrainState:
    """The state of a checkpoint folder, after checking its format and files."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise CheckpointFormatError(f"checkpoint {folder} lacks {STATE_FILE}")
    payload = json.loads(state_file.read_text())
    check_format(folder, payload)
    required = (
        (DCP_METADATA_FILE,)
        if payload["format"] == 3
        else (LEGACY_WEIGHTS_FILE, LEGACY_OPTIMIZER_FILE)
    )
    for name in required:
        if not (folder / name).exists():
            raise CheckpointFormatError(f"checkpoint {folder} lacks {name}")
    layout = payload.get("layout")
    return TrainState(
        stage_index=payload["stage_index"],
        next_step=payload["next_step"],
        guard_state=payload["guard"],
        layout=BatchLayout(**layout) if layout else None,
        folder=folder,
        format=payload["format"],
    )
