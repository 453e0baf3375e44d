"""A training checkpoint applied to the modules built from a package's bases: the one place the
checkpoint's tensor names and shapes are checked against the model (export_package in
components/inference/package.py), and what a package records of the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from components.training.checkpoint_state import STATE_FILE


class PackageError(ValueError):
    """A package or checkpoint that is malformed, incomplete or does not fit its bases."""


def apply_checkpoint(weights_file: Path, modules: dict[str, nn.Module]) -> None:
    """Copy every checkpoint tensor into the parameter of that name (strict names and shapes);
    the connector has no base, so the checkpoint must hold it whole."""
    parameters = {
        f"{prefix}.{name}": param
        for prefix, module in modules.items()
        for name, param in module.named_parameters()
    }
    with safe_open(weights_file, framework="pt", device="cpu") as weights:
        names = sorted(weights.keys())
        unknown = [name for name in names if name not in parameters]
        if unknown:
            raise PackageError(
                f"checkpoint {weights_file}: tensor {unknown[0]!r} is not a parameter of the "
                f"model built from the bases ({len(unknown)} unknown)"
            )
        connector = sorted(f"connector.{key}" for key, _ in modules["connector"].named_parameters())
        missing = [name for name in connector if name not in names]
        if missing:
            raise PackageError(
                f"checkpoint {weights_file} lacks the connector ({', '.join(missing)}): "
                "not a training checkpoint of this model"
            )
        with torch.no_grad():
            for name in names:
                tensor, param = weights.get_tensor(name), parameters[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise PackageError(
                        f"checkpoint {weights_file}: tensor {name!r} has shape "
                        f"{tuple(tensor.shape)}, the model built from the bases has "
                        f"{tuple(param.shape)}"
                    )
                param.copy_(tensor)


def checkpoint_linear(weights_file: Path, prefix: str) -> nn.Linear | None:
    """A Linear shaped like the checkpoint's `<prefix>weight` / `bias`; None when it has none."""
    with safe_open(weights_file, framework="pt", device="cpu") as weights:
        if f"{prefix}weight" not in weights.keys():
            return None
        out_features, in_features = weights.get_slice(f"{prefix}weight").get_shape()
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
