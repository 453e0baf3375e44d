"""Full copies of a (possibly FSDP-sharded) model's state, for tests and the checkpoint
benchmark: what rank 0 gathered before checkpoints went through torch.distributed.checkpoint
(format 2), kept to compare sharded runs with unsharded ones and as the benchmark's baseline.
Every worker must call these (they are collectives under FSDP)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.training.fsdp import full_tensor, reshard


def gather_parameters(model: nn.Module, prefixes: tuple[str, ...], *, rank: int) -> dict:
    """Full CPU copies of the parameters whose names start with `prefixes`, on rank 0 (other
    ranks take part in the all-gathers and get an empty dict), one parameter at a time."""
    reshard(model)
    weights = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith(prefixes):
                continue
            whole = full_tensor(param.detach())
            if rank == 0:
                weights[name] = whole.cpu().contiguous()
    return weights


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, on CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def merge_into(target: Path):
    """A checkpoint publisher that copies each worker's folder into `target`, as Ray Train
    merges the workers' folders of one report into one checkpoint."""

    def publish(folder: Path, metrics: dict[str, float]) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for item in Path(folder).iterdir():
            shutil.copy2(item, target / item.name)

    return publish
