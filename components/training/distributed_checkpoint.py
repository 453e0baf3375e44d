"""Training checkpoints through torch.distributed.checkpoint (DCP): each worker writes and reads
its own pieces; nothing is gathered onto one rank.

Entries (flat names, see components/training/checkpoint_state.py): `model.<param>` for the
parameters named by the caller's prefixes, `optim.<param>.<key>` for every AdamW state tensor,
`ema.<param>` for the EMA shadow. Under FSDP2 a parameter, its AdamW moments and its EMA are
DTensors sharded on dim 0: DCP writes each worker's shard once and, on load, reads exactly the
rows the loading worker's shard covers, whatever the number of workers that wrote it. Unsharded
(DDP-style) tensors are the same on every worker; DCP writes each once.

`CheckpointWriter.save` writes a folder in the calling process (every worker calls it: it is a
collective); with `asynchronous`, DCP copies the entries to host memory, writes them in a
background thread over a dedicated gloo group, and `poll` / `finish` hand the folder on when every
worker's write is done. `restore` fills a model, optimizer and EMA in place from a folder;
`checkpoint_weights` reads a checkpoint's full weights in one process (export).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.training.checkpoint_state import (
    EMA_PREFIX,
    LEGACY_WEIGHTS_FILE,
    MODEL_PREFIX,
    OPTIMIZER_PREFIX,
    STATE_FILE,
    CheckpointFormatError,
    TrainState,
    check_format,
    write_state_file,
)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def checkpoint_entries(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    prefixes: tuple[str, ...],
    *,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint, by entry name (live tensors: DCP reads them while
    saving; the asynchronous path copies them first)."""
    entries: dict[str, torch.Tensor] = {}
    names = {}
    for name, param in model.named_parameters():
        names[id(param)] = name
        if name.startswith(prefixes):
            entries[f"{MODEL_PREFIX}{name}"] = param.detach()
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                entries[f"{OPTIMIZER_PREFIX}{names[id(param)]}.{key}"] = value
    for name, shadow in (ema or {}).items():
        entries[f"{EMA_PREFIX}{name}"] = shadow
    return entries


PublishFn = Callable[[Path, dict[str, float]], None]


@dataclass
class _Pending:
    future: Any
    folder: tempfile.TemporaryDirectory
    metrics: dict[str, float]


class CheckpointWriter:
    """Writes checkpoint folders on this worker and publishes each when complete everywhere.

    publish(folder, metrics) is called once per checkpoint on every worker, with this worker's
    folder (deleted after the call): Ray Train merges the workers' folders into one."""

    def __init__(self, *, rank: int, asynchronous: bool = False) -> None:
        self.rank = rank
        self.asynchronous = asynchronous
        self._pending: _Pending | None = None
        self._group = None

    def save(
        self,
        state: TrainState,
        entries: dict[str, torch.Tensor],
        metrics: dict[str, float],
        *,
        publish: PublishFn,
    ) -> None:
        """Write `entries` + state.json (rank 0) into a fresh folder, then publish it; with
        `asynchronous`, publish later (`poll`, `finish`). A previous write is finished first."""
        import torch.distributed.checkpoint as dcp

        self.finish(publish)
        folder = tempfile.TemporaryDirectory(prefix="checkpoint-")
        path = Path(folder.name)
        if self.rank == 0:
            write_state_file(path, state)
        no_dist = not _distributed()
        if not self.asynchronous:
            dcp.save(entries, checkpoint_id=path, no_dist=no_dist)
            self._publish(_Pending(None, folder, metrics), publish)
            return
        future = dcp.async_save(
            entries, checkpoint_id=path, no_dist=no_dist, process_group=self._gloo_group()
        )
        self._pending = _Pending(future, folder, metrics)

    def poll(self, publish: PublishFn) -> None:
        """Publish a pending write once every worker's is done (one small all-reduce; call it
        at the same point on every worker, e.g. after each step)."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending.future.done())])
        if _distributed():
            import torch.distributed as dist

            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._gloo_group())
        if int(done):
            self.finish(publish)

    def finish(self, publish: PublishFn) -> None:
        """Wait for a pending write (every worker) and publish it."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.future.result()
        self._publish(pending, publish)

    def _publish(self, pending: _Pending, publish: PublishFn) -> None:
        try:
            publish(Path(pending.folder.name), pending.metrics)
        finally:
            pending.folder.cleanup()

    def _gloo_group(self):
        """A gloo group of all workers for the background writes (their collectives must not
        interleave with training's on the default group; NCCL-only groups cannot save async)."""
        if self._group is None and _distributed():
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")
        return self._group


def _metadata(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata().state_dict_metadata


def restore(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Fill `model`'s saved parameters, `optimizer`'s state and `ema` (shadows by parameter
    name) in place from a format-3 folder; every worker calls it. Names and shapes are checked;
    a parameter without saved AdamW state (it had no gradient yet) keeps none, as in the saved
    run."""
    import torch.distributed.checkpoint as dcp

    saved = _metadata(folder)
    parameters = dict(model.named_parameters())
    targets: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, meta in saved.items():
        kind, _, name = key.partition(".")
        if kind == MODEL_PREFIX[:-1] or kind == EMA_PREFIX[:-1]:
            param = _parameter(parameters, name, folder)
            _check_shape(folder, key, tuple(meta.size), tuple(param.shape))
            if kind == MODEL_PREFIX[:-1]:
                targets[key] = param.detach()
            elif ema is not None:
                if name not in ema:
                    raise CheckpointFormatError(
                        f"checkpoint {folder}: an EMA of {name}, which this training never trained"
                    )
                targets[key] = ema[name]
        elif kind == OPTIMIZER_PREFIX[:-1]:
            name, _, state_key = name.rpartition(".")
            param = _parameter(parameters, name, folder)
            if tuple(meta.size) == tuple(param.shape):
                value = torch.zeros_like(param.detach(), dtype=meta.properties.dtype)
            else:  # AdamW's step count: a scalar on the host
                value = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
            moments.setdefault(name, {})[state_key] = targets[key] = value
        else:
            raise CheckpointFormatError(f"checkpoint {folder}: unknown entry {key!r}")
    if ema is not None and not any(key.startswith(EMA_PREFIX) for key in saved):
        raise CheckpointFormatError(
            f"checkpoint {folder} holds no EMA weights, and this training keeps them "
            "(train.ema.decay): it was written by a training without EMA"
        )
    dcp.load(targets, checkpoint_id=folder, no_dist=not _distributed())
    trained = {id(param) for group in optimizer.param_groups for param in group["params"]}
    for name, state in moments.items():
        if id(parameters[name]) not in trained:
            raise CheckpointFormatError(
                f"checkpoint {folder}: AdamW state for {name}, which this stage does not train"
            )
        optimizer.state[parameters[name]] = state


def restore_train_state(
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """`restore` for a format-3 folder; a format-2 folder (full tensors + a name-keyed AdamW
    state, from before DCP) is read through its own path, once, and holds no EMA."""
    if state.folder is None:
        raise CheckpointFormatError("a TrainState without a folder cannot be restored")
    if state.format == 3:
        restore(state.folder, model, optimizer, ema=ema)
        return
    if ema is not None:
        raise CheckpointFormatError(
            f"checkpoint {state.folder} (format 2) was written before EMA existed: resume it "
            "without train.ema.decay, or start a new training"
        )
    from safetensors.torch import load_file

    from components.training.checkpoint_state import LEGACY_OPTIMIZER_FILE
    from components.training.fsdp import load_optimizer_state, load_parameters

    weights = load_file(str(state.folder / LEGACY_WEIGHTS_FILE))
    load_parameters(model, weights, source=f"checkpoint {state.folder}")
    moments = torch.load(state.folder / LEGACY_OPTIMIZER_FILE, weights_only=True)
    load_optimizer_state(model, optimizer, moments)


def _parameter(parameters: dict[str, nn.Parameter], name: str, folder: Path) -> nn.Parameter:
    if name not in parameters:
        raise CheckpointFormatError(f"checkpoint {folder}: {name!r} is not a model parameter")
    return parameters[name]


def _check_shape(folder: Path, key: str, saved: tuple, model: tuple) -> None:
    if saved != model:
        raise CheckpointFormatError(
            f"checkpoint {folder}: {key} has shape {saved}, the model has {model}"
        )


def read_entries(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the entries under `prefix`, by name without it (one process)."""
    import torch.distributed.checkpoint as dcp

    targets = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in _metadata(folder).items()
        if key.startswith(prefix)
    }
    if targets:
        dcp.load(targets, checkpoint_id=folder, no_dist=True)
    return {key[len(prefix) :]: value for key, value in targets.items()}


def checkpoint_weights(folder: Path, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a checkpoint's trained parameters by name (`transformer.*`, `tail.*`,
    `connector.*`, ...): the raw weights, or with `ema` their exponential moving average. Read
    in this one process, whatever number of workers wrote it."""
    state_file = Path(folder) / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    check_format(folder, state)
    if state["format"] == 2:
        if ema:
            raise CheckpointFormatError(f"checkpoint {folder} (format 2) holds no EMA weights")
        from safetensors.torch import load_file

        return load_file(str(Path(folder) / LEGACY_WEIGHTS_FILE))
    prefix = EMA_PREFIX if ema else MODEL_PREFIX
    weights = read_entries(Path(folder), prefix)
    if ema and not weights:
        raise CheckpointFormatError(
            f"checkpoint {folder} holds no EMA weights (train with train.ema.decay set)"
        )
    return weights
