"""Every path of one run directory, in one place.

    <root>/data/...                  the data pipeline's files (pipelines/data_layout.py), unless
                                     train.dataset names another dataset root
    <root>/train/<training>/         Ray Train's storage: checkpoint_*/ folders (train.storage_path
                                     may move it, to a local folder or s3:// / gs://)
    <root>/train-cache/<training>/   final checkpoints read back from object storage to register
    <root>/trainings/<training>.json the training's MLflow parent run (kept for resume)
    <root>/workflow/                 workflow runs (runs/<id>.json) and step markers (steps/)
    <root>/packages/<run id>/        the exported model package of a training run
    <root>/packages/.registry/       registered packages downloaded for the gate (the champion)
    <root>/mlflow.db, mlartifacts/   SQLite tracking store and artifacts (unless tracking.* says)
    <root>/demo-requests/            the demo's request file and its images
    <root>/inference/                the demo's batch inference output (images/, results.parquet)
    <root>/ray/                      the in-process Ray cluster's session files
    <root>/logs/                     full logs of CLI runs (the terminal shows a summary)

Local paths are resolved against the working directory, so Ray workers (which run in their own
folders) see the same files as the driver.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.data_layout import DataLayout

_HOW_IT_RUNS = ("resources", "async_checkpoints")
"""Train settings a training's name leaves out: a resume may change them."""
_ADDED_WITH_FORMAT_3 = ("async_checkpoints", "ema")
"""Train settings that did not exist when names hashed the resources too."""


@dataclass(frozen=True, slots=True)
class RunLayout:
    """The paths of the run a config describes."""

    config: PipelineConfig

    @property
    def root(self) -> Path:
        return Path(self.config.run.root).resolve()

    @property
    def data(self) -> DataLayout:
        """The data pipeline's files (source list, chunks, shards, manifest)."""
        return DataLayout(self.root)

    @property
    def dataset_root(self) -> Path:
        """The dataset training reads (holds manifest.json): train.dataset or <root>/data."""
        return Path(self.config.train.dataset or self.data.data).resolve()

    @property
    def train_storage(self) -> str:
        """Ray Train's storage_path: a resolved local folder or an object-store URI."""
        path = self.config.train.storage_path or str(self.root / "train")
        return path if "://" in path else str(Path(path).resolve())

    def training_name(self, dataset_id: str, *, salt: str = "") -> str:
        """The name of the training of this train config on dataset `dataset_id`: Ray Train's
        run name (its folder under the storage) and the MLflow parent's prefix. A changed train
        config or dataset trains afresh under a new name; the same ones resume. `salt` (a
        workflow run id) forces a fresh training of unchanged inputs. A training begun before
        checkpoint format 3 (whose name also hashed its resources) keeps its name."""
        from pipelines.config_loading import to_plain

        # Where the dataset and checkpoints live, and what runs it (workers, strategy,
        # precision policy, async writes), is not what is trained: leave them out, so a resume
        # on other resources continues the same training (the checkpoint keeps the batch layout).
        train = to_plain(replace(self.config.train, dataset="", storage_path=""))
        what = {key: value for key, value in train.items() if key not in _HOW_IT_RUNS}
        name = self._hashed_name(what, dataset_id, salt)
        earlier = {key: value for key, value in train.items() if key not in _ADDED_WITH_FORMAT_3}
        legacy = self._hashed_name(earlier, dataset_id, salt)
        if not self.training_marker(name).exists() and self.training_marker(legacy).exists():
            return legacy
        return name

    def _hashed_name(self, plain: dict, dataset_id: str, salt: str) -> str:
        canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        key = f"{digest}:{dataset_id}:{salt}"
        return f"{self.config.run.name}-train-{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    def current_training_name(self) -> str:
        """The unsalted training name for the dataset training reads now."""
        from components.data import shard_format

        return self.training_name(shard_format.read_manifest(self.dataset_root)["dataset_id"])

    @property
    def is_storage_local(self) -> bool:
        return "://" not in self.train_storage

    def checkpoint_states(self, training: str) -> list[tuple[Path | str, dict]]:
        """(folder, state.json contents) of a training's checkpoints, oldest first: local
        folders, or URIs on object storage (s3://, gs://; pipelines/storage.py)."""
        from components.training.checkpoint_state import STATE_FILE

        if not self.is_storage_local:
            from pipelines.storage import list_checkpoint_states

            return list_checkpoint_states(f"{self.train_storage}/{training}", STATE_FILE)
        run_dir = Path(self.train_storage) / training
        return [
            (state_file.parent, json.loads(state_file.read_text()))
            for state_file in sorted(run_dir.glob(f"checkpoint_*/{STATE_FILE}"))
        ]

    def train_cache(self, training: str) -> Path:
        """Local copies of a training's checkpoints read back from object storage."""
        return self.root / "train-cache" / training

    def training_marker(self, training: str) -> Path:
        """The training's MLflow parent run id and inputs (written when it starts)."""
        return self.root / "trainings" / f"{training}.json"

    @property
    def workflow(self) -> Path:
        """Workflow run records (runs/<id>.json) and step completion markers (steps/)."""
        return self.root / "workflow"

    def package_dir(self, training_run_id: str, *, weights: str = "raw") -> Path:
        """The package exported from a training's final checkpoint (its raw weights or EMA)."""
        suffix = "" if weights == "raw" else f"-{weights}"
        return self.root / "packages" / f"{training_run_id}{suffix}"

    @property
    def registry_cache(self) -> Path:
        """Registered packages downloaded to compare with (components/inference/registry.py)."""
        return self.root / "packages" / ".registry"

    @property
    def tracking_uri(self) -> str:
        """tracking.tracking_uri, or the SQLite file <root>/mlflow.db."""
        return self.config.tracking.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        """tracking.artifact_location, or <root>/mlartifacts."""
        return self.config.tracking.artifact_location or (self.root / "mlartifacts").as_uri()

    @property
    def demo_requests(self) -> Path:
        return self.root / "demo-requests"

    @property
    def inference(self) -> Path:
        return self.root / "inference"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def with_absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """Workers run in their own folders: local paths the driver sees become absolute."""
    encode = config.data.encode
    absolute = {
        name: str(Path(getattr(encode, name)).resolve())
        for name in ("qwen2vl", "flux")
        if Path(getattr(encode, name)).exists()
    }
    return replace(
        config,
        run=replace(config.run, root=str(Path(config.run.root).resolve())),
        data=replace(config.data, encode=replace(encode, **absolute)),
    )
