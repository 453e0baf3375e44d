"""Resolving a checkpoint named in a config: a local folder or a hub id in the local HF cache.

Input: a name (path or `owner/repo`), an optional revision, the file that marks the root and the
weight stems that must be complete. Output: a ResolvedCheckpoint (folder + a revision id that
identifies its exact content), or CheckpointNotFoundError naming what is missing. Nothing is
downloaded: a hub id must already be in the local cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint named in the config is missing or incomplete."""


@dataclass(frozen=True, slots=True)
class ResolvedCheckpoint:
    """A checkpoint folder on local disk and what identifies its exact content."""

    path: Path
    revision_id: str
    """Commit hash when it came from the HF cache, else 'local:<sha256 of the root config>'."""


def resolve_checkpoint(
    name: str, *, revision: str | None, root_file: str, required: tuple[str, ...]
) -> ResolvedCheckpoint:
    """Find a checkpoint folder (local dir or HF-cache snapshot) and check it is complete.

    root_file is the file that marks the root (config.json, model_index.json); required lists
    relative weight stems ('model', 'vae/diffusion_pytorch_model') that must have a single
    .safetensors file or an index whose every shard exists.
    """
    local = Path(name).expanduser()
    if local.exists():
        if revision is not None:
            raise ValueError(f"revision {revision!r} given for local checkpoint directory {name}")
        path = local
    elif _HUB_ID.match(name):
        cached = try_to_load_from_cache(name, root_file, revision=revision)
        if not isinstance(cached, str):
            raise CheckpointNotFoundError(
                f"checkpoint {name!r} (revision {revision or 'main'}) is not a local directory and "
                f"its {root_file} is not in the local HF cache; download it first"
            )
        path = Path(cached).parent
    else:
        raise CheckpointNotFoundError(f"checkpoint directory {name} does not exist")
    for relative in (root_file, *required):
        _check_present(path, relative, name=name)
    if path.parent.name == "snapshots":
        revision_id = path.name
    else:
        revision_id = "local:" + hashlib.sha256((path / root_file).read_bytes()).hexdigest()
    return ResolvedCheckpoint(path=path, revision_id=revision_id)


def _check_present(root: Path, relative: str, *, name: str) -> None:
    if relative.endswith((".json", "/")):
        if not (root / relative).exists():
            raise CheckpointNotFoundError(f"checkpoint {name}: missing {root / relative}")
        return
    single = root / f"{relative}.safetensors"
    index = root / f"{relative}.safetensors.index.json"
    if single.is_file():
        return
    if not index.is_file():
        raise CheckpointNotFoundError(f"checkpoint {name}: missing {single} (or {index.name})")
    shard_names = set(json.loads(index.read_text())["weight_map"].values())
    missing = sorted(s for s in shard_names if not (index.parent / s).is_file())
    if missing:
        raise CheckpointNotFoundError(f"checkpoint {name}: {index} lists missing shards {missing}")
