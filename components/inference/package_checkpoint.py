"""A training checkpoint applied to the modules built from a package's bases: the one place the
checkpoint's tensor names and shapes are checked against the model (export_package in
components/inference/package.py), and what a package records of the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from components.training.checkpoint_state import STATE_FILE


class PackageError(ValueError):
    """A package or checkpoint that is malformed, incomplete or does not fit its bases."""


def apply_checkpoint(
    weights: Mapping[str, torch.Tensor], modules: dict[str, nn.Module], *, source: str
) -> None:
    """Copy every checkpoint tensor (components/training/checkpoint_state.checkpoint_weights)
    into the parameter of that name (strict names and shapes); the connector has no base, so
    the checkpoint must hold it whole. `source` names the checkpoint in errors."""
    parameters = {
        f"{prefix}.{name}": param
        for prefix, module in modules.items()
        for name, param in module.named_parameters()
    }
    names = sorted(weights)
    unknown = [name for name in names if name not in parameters]
    if unknown:
        raise PackageError(
            f"checkpoint {source}: tensor {unknown[0]!r} is not a parameter of the model "
            f"built from the bases ({len(unknown)} unknown)"
        )
    connector = sorted(f"connector.{key}" for key, _ in modules["connector"].named_parameters())
    missing = [name for name in connector if name not in weights]
    if missing:
        raise PackageError(
            f"checkpoint {source} lacks the connector ({', '.join(missing)}): "
            "not a training checkpoint of this model"
        )
    with torch.no_grad():
        for name in names:
            tensor, param = weights[name], parameters[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise PackageError(
                    f"checkpoint {source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model built from the bases has {tuple(param.shape)}"
                )
            param.copy_(tensor)


def checkpoint_linear(weights: Mapping[str, torch.Tensor], prefix: str) -> nn.Linear | None:
    """A Linear shaped like the checkpoint's `<prefix>weight` / `bias`; None when it has none."""
    if f"{prefix}weight" not in weights:
        return None
    out_features, in_features = weights[f"{prefix}weight"].shape
    return nn.Linear(in_features, out_features)


def checkpoint_summary(checkpoint_dir: Path) -> dict:
    summary: dict = {"path": str(checkpoint_dir.absolute())}
    state_file = checkpoint_dir / STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        for key in ("format", "stage_index", "next_step"):
            if key in state:
                summary[key] = state[key]
    return summary
