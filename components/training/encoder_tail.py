"""Load Qwen2-VL's trainable tail (last decoder layer + final norm + rope) from a checkpoint.

Input: a Qwen2-VL checkpoint (local directory or hub id in the local HF cache) in the public
layout: config.json and model.safetensors (single file) or model.safetensors.index.json + shards.
Output: a Qwen2VLTail (model/qwen2vl_tail.py) whose layer and norm hold exactly the checkpoint's
tensors, cast to the requested dtype. Only the tail's tensors are read, through safetensors'
lazy safe_open, and only the shard files that hold them are opened: a 7B checkpoint is never
materialised to get one layer (~233M parameters of Qwen2-VL-7B's 8.3B).
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import Qwen2VLConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from components.checkpoints import CheckpointNotFoundError, resolve_checkpoint
from model.qwen2vl_tail import Qwen2VLTail

WEIGHTS_STEM = "model"
# Where the text model's tensors live: the legacy names of the released Qwen2-VL checkpoints
# (which transformers 5.24 still writes) and the newer nested layout, tried in this order.
TEXT_MODEL_PREFIXES = ("model.", "model.language_model.")


class TailCheckpointError(ValueError):
    """A checkpoint that lacks (or holds unexpected) tensors of the last layer or final norm."""


def load_qwen2vl_tail(
    checkpoint: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Qwen2VLTail:
    """The last decoder layer + final norm of a Qwen2-VL checkpoint, without the other layers.

    Parameters are cast to dtype (the same cast from_pretrained(dtype=...) applies, so the tail
    equals Qwen2VLTail.from_model of the full model bit for bit); the rope buffers stay float32.
    attn_implementation is what from_pretrained would pick ('sdpa' by default, or 'eager').
    The tail is returned in training mode with requires_grad set: it is the trainable part.
    Errors: CheckpointNotFoundError for a missing checkpoint, config, index or needed shard file;
    TailCheckpointError naming any missing or unexpected tensor.
    """
    if attn_implementation not in ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()):
        raise ValueError(f"attn_implementation {attn_implementation!r} is not known")
    resolved = resolve_checkpoint(
        checkpoint, revision=revision, root_file="config.json", required=()
    )
    text_config = Qwen2VLConfig.from_pretrained(resolved.path).text_config
    text_config._attn_implementation = attn_implementation
    last_index = text_config.num_hidden_layers - 1
    tail = Qwen2VLTail.skeleton(text_config)
    layer, norm = tail.layer, tail.norm
    weight_map = checkpoint_weight_map(resolved.path, name=checkpoint)
    prefix = text_model_prefix(weight_map, name=checkpoint)
    wanted = _checkpoint_names(layer, norm, prefix=prefix, last_index=last_index)
    _check_names(wanted, weight_map, layer_prefix=f"{prefix}layers.{last_index}.", name=checkpoint)
    tensors = _read_tensors(resolved.path, weight_map, wanted.values(), name=checkpoint)
    _assign(layer, {key: tensors[wanted[f"layer.{key}"]] for key in layer.state_dict()}, dtype)
    _assign(norm, {key: tensors[wanted[f"norm.{key}"]] for key in norm.state_dict()}, dtype)
    return tail


def checkpoint_weight_map(root: Path, *, name: str, stem: str = WEIGHTS_STEM) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single weights file (`stem`:
    "model" for transformers checkpoints, "diffusion_pytorch_model" for diffusers ones)."""
    index = root / f"{stem}.safetensors.index.json"
    single = root / f"{stem}.safetensors"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointNotFoundError(
                f"checkpoint {name}: corrupt index {index}: {error!r}"
            ) from None
    if single.is_file():
        with safe_open(single, framework="pt", device="cpu") as weights:
            return dict.fromkeys(weights.keys(), single.name)
    raise CheckpointNotFoundError(f"checkpoint {name}: missing {single} (or {index.name})")


def text_model_prefix(weight_map: dict[str, str], *, name: str) -> str:
    for prefix in TEXT_MODEL_PREFIXES:
        if f"{prefix}norm.weight" in weight_map:
            return prefix
    expected = " or ".join(f"{prefix}norm.weight" for prefix in TEXT_MODEL_PREFIXES)
    raise TailCheckpointError(f"checkpoint {name}: no tensor {expected} (final norm)")


@dataclass(frozen=True, slots=True)
class TailLocation:
    """Where a Qwen2-VL checkpoint keeps its tail: its weight map, the text model's name prefix
    and the last decoder layer's index."""

    weight_map: dict[str, str]
    prefix: str
    last_index: int

    def checkpoint_name(self, tail_key: str) -> str:
        """The checkpoint tensor name of a tail state-dict key ('layer.*' or 'norm.*')."""
        if tail_key.startswith("norm."):
            return f"{self.prefix}{tail_key}"
        return f"{self.prefix}layers.{self.last_index}.{tail_key.removeprefix('layer.')}"


def locate_tail(root: Path, *, name: str) -> TailLocation:
    """The TailLocation of the Qwen2-VL checkpoint folder `root` (its config.json and index)."""
    config = json.loads((root / "config.json").read_text())
    last_index = int((config.get("text_config") or config)["num_hidden_layers"]) - 1
    weight_map = checkpoint_weight_map(root, name=name)
    return TailLocation(weight_map, text_model_prefix(weight_map, name=name), last_index)


def _checkpoint_names(
    layer: nn.Module, norm: nn.Module, *, prefix: str, last_index: int
) -> dict[str, str]:
    """Tail state-dict key ('layer.*', 'norm.*') -> checkpoint tensor name."""
    location = TailLocation({}, prefix, last_index)
    keys = [f"layer.{key}" for key in layer.state_dict()] + [f"norm.{k}" for k in norm.state_dict()]
    return {key: location.checkpoint_name(key) for key in keys}


def _check_names(
    wanted: dict[str, str], available: dict[str, str], *, layer_prefix: str, name: str
) -> None:
    """Strict key check against the index: every tail tensor present, none unexpected."""
    missing = sorted(set(wanted.values()) - set(available))
    present = {key for key in available if key.startswith(layer_prefix)}
    unexpected = sorted(present - set(wanted.values()))
    if missing or unexpected:
        raise TailCheckpointError(
            f"checkpoint {name}: tail tensors do not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )


def _read_tensors(
    root: Path, weight_map: dict[str, str], names: Iterable[str], *, name: str
) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each shard that holds one exactly once."""
    by_file: dict[str, list[str]] = {}
    for tensor_name in names:
        by_file.setdefault(weight_map[tensor_name], []).append(tensor_name)
    tensors = {}
    for file_name, tensor_names in sorted(by_file.items()):
        path = root / file_name
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"checkpoint {name}: shard {path} (holds {tensor_names[0]}) is missing"
            )
        with safe_open(path, framework="pt", device="cpu") as weights:
            stored = set(weights.keys())
            for tensor_name in tensor_names:
                if tensor_name not in stored:
                    raise TailCheckpointError(
                        f"checkpoint {name}: {path} does not hold {tensor_name} (index says so)"
                    )
                tensors[tensor_name] = weights.get_tensor(tensor_name)
    return tensors


def _assign(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Load meta-device parameters from real tensors (strict keys; floats cast to dtype)."""
    cast = {
        key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()
    }
    module.load_state_dict(cast, strict=True, assign=True)


def qwen2vl_prefix_sha256(checkpoint: str | Path, *, revision: str | None = None) -> str:
    """sha256 of the frozen prefix a Qwen2-VL checkpoint holds: every tensor but lm_head, the last
    decoder layer and the final norm, each as its name, dtype, shape and bytes, in name order.

    Two checkpoints get the same hash exactly when their prefixes are equal bit for bit,
    whatever their sharding, their last layer, whether they have lm_head, and whether they use
    the legacy tensor names or the nested ones (names are compared with the text model's and
    the vision tower's prefixes stripped). This is what shards encoded by one checkpoint and a
    package built on another must agree on before training continues from the package.
    """
    root = resolve_checkpoint(
        str(checkpoint), revision=revision, root_file="config.json", required=()
    ).path
    location = locate_tail(root, name=str(checkpoint))
    weight_map, prefix = location.weight_map, location.prefix
    skipped = (f"{prefix}layers.{location.last_index}.", f"{prefix}norm.", "lm_head.")
    names = {_canonical_name(key, prefix): key for key in weight_map if not key.startswith(skipped)}
    by_file: dict[str, list[str]] = {}
    for canonical in sorted(names):
        by_file.setdefault(weight_map[names[canonical]], []).append(canonical)
    # One digest per tensor (shards are read in file order, one tensor in memory at a time),
    # then one over the sorted per-tensor lines.
    lines: dict[str, str] = {}
    for file_name, canonicals in sorted(by_file.items()):
        with safe_open(root / file_name, framework="pt", device="cpu") as weights:
            for canonical in canonicals:
                tensor = weights.get_tensor(names[canonical]).contiguous()
                data = tensor.reshape(-1).view(torch.uint8).numpy()
                tensor_sha = hashlib.sha256(memoryview(data)).hexdigest()
                lines[canonical] = f"{canonical}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor_sha}"
    digest = hashlib.sha256("\n".join(lines[name] for name in sorted(lines)).encode())
    return digest.hexdigest()


def _canonical_name(key: str, text_prefix: str) -> str:
    if key.startswith(text_prefix):
        return "text." + key[len(text_prefix) :]
    return key.removeprefix("model.")  # model.visual.* (nested names) -> visual.*
