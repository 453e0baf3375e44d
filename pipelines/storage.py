"""Object storage for what the run keeps outside its run directory: Ray Train's checkpoints
(`train.storage_path`) as a local folder or an `s3://` / `gs://` URI, through pyarrow's
filesystems (the same ones Ray Train writes with).

Credentials and endpoints come from the environment, as pyarrow and Ray read them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION,
GOOGLE_APPLICATION_CREDENTIALS; pipelines/environment.py forwards them to workers and jobs).
MLflow artifacts on object storage go through MLflow's own artifact repositories
(`tracking.artifact_location`); the run directory itself is a POSIX path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def is_remote(uri: str) -> bool:
    return "://" in uri


def remote_file_stamp(uri: str) -> str:
    """ "<size>:<mtime ns>" of a file on object storage, "absent" when there is none, or
    "unreachable: <error>" when it cannot be asked (its listing then counts it as unreadable):
    a stamp that changes when the object is rewritten, without reading it."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except (OSError, pa.ArrowException) as error:
        return f"unreachable: {type(error).__name__}"
    if info.type != pafs.FileType.File:
        return "absent"
    return f"{info.size}:{info.mtime_ns}"


def checkpoint_uri(checkpoint) -> str:
    """A ray.train.Checkpoint's location as a URI (Ray keeps a scheme-less path and its
    filesystem), or a local path."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(checkpoint.filesystem.type_name)
    return f"{scheme}://{checkpoint.path}" if scheme else str(checkpoint.path)


def list_checkpoint_states(run_uri: str, state_file: str) -> list[tuple[str, dict[str, Any]]]:
    """(checkpoint folder URI, its `state_file` contents) for every `checkpoint_*` folder of a
    Ray Train run on object storage that holds one, oldest first."""
    import pyarrow.fs as pafs

    filesystem, base = pafs.FileSystem.from_uri(run_uri)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as error:
        raise OSError(f"cannot list {run_uri}: {error}") from None
    folders = sorted(
        entry.base_name
        for entry in entries
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_")
    )
    states = []
    for name in folders:
        path = f"{base}/{name}/{state_file}"
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            continue
        with filesystem.open_input_stream(path) as stream:
            states.append((f"{run_uri}/{name}", json.loads(stream.read())))
    return states


def download_folder(uri: str, destination: Path) -> Path:
    """Copy a folder from object storage to `destination` (through a temp folder and a rename,
    so a complete copy is reused and a killed one is redone)."""
    import pyarrow.fs as pafs

    if destination.is_dir():
        return destination
    temp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    filesystem, base = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(
        base,
        str(temp),
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    os.replace(temp, destination)
    return destination
