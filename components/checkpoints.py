"""Resolving a checkpoint named in a config: a local folder or a hub id in the local HF cache.

Input: a name (path or `owner/repo`), an optional revision, the file that marks the root and the
weight stems that must be complete. Output: a ResolvedCheckpoint (folder + a revision id that
identifies its exact content), or CheckpointNotFoundError naming what is missing. Nothing is
downloaded: a hub id must already be in the local cache. `FileHashCache` / `hash_file` give the
sha256 of checkpoint files (what a model package records of its frozen bases); `write_staged`
writes a checkpoint-like folder that appears only complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HASH_CACHE_FILE = "base_file_hashes.json"
_HASH_CHUNK_BYTES = 8 << 20

logger = logging.getLogger(__name__)


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


class FileHashCache:
    """sha256 of files, remembered by (absolute path, size, mtime_ns) in a small JSON file.

    See load_package for what it trusts. Writes are atomic (temp file + os.replace) and merge
    with what is on disk; a folder that cannot be written just leaves the cache unsaved.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / HASH_CACHE_FILE
        self._entries = self._read()
        self._added: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text()).get("entries", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def sha256(self, path: Path) -> str:
        key = str(Path(path).absolute())
        stat = os.stat(path)
        entry = self._added.get(key) or self._entries.get(key)
        if (
            entry
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        ):
            return entry["sha256"]
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": hash_file(path)}
        self._added[key] = entry
        return entry["sha256"]

    def save(self) -> None:
        if not self._added:
            return
        entries = self._read() | self._added
        temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps({"format": 1, "entries": entries}, sort_keys=True))
            os.replace(temp, self.path)
        except OSError as error:
            temp.unlink(missing_ok=True)
            logger.warning("could not save the file hash cache %s: %s", self.path, error)
            return
        self._entries, self._added = entries, {}


def hash_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_staged(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Run `write(staging)` on a fresh staging folder beside out_dir, then rename it to out_dir:
    the folder appears only complete; a failed write leaves nothing behind."""
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        write(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
