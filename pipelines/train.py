"""The training workflow: three stages on Ray Train over the cached shards, tracked in MLflow.

`run_training(config)` opens (or reopens, on resume) the MLflow parent run, then runs one
TorchTrainer whose workers walk the stages (pipelines/train_worker.py). A training is named by
its train config and the dataset it reads (`RunLayout.training_name`): rerunning the same
command after a crash resumes (Ray Train finds the latest checkpoint under the same name, and
the parent run id is kept in <root>/trainings/<name>.json); a changed config or dataset trains
afresh under a new name, beside the earlier trainings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.data import shard_format
from pipelines.config import PipelineConfig
from pipelines.config_loading import config_hash, flatten, to_plain
from pipelines.data_report import code_version
from pipelines.environment import forwarded_environment
from pipelines.ray_session import ray_session
from pipelines.run_layout import RunLayout, with_absolute_paths
from pipelines.train_tracking import experiment_id, stage_progress, tracking_uri


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingRun:
    """A finished training: its name, MLflow parent run, dataset and Ray Train result."""

    name: str
    parent_run_id: str
    dataset_id: str
    dataset_version: int
    """The dataset version it trained on (components/data/shard_format.py)."""
    result: Any
    """ray.train.Result (checkpoint, metrics)."""


def run_training(
    config: PipelineConfig, *, workflow_run_id: str | None = None, salt: str = ""
) -> TrainingRun:
    """Train (or resume) all stages. `workflow_run_id` nests the training's MLflow parent run
    under a workflow run; `salt` forces a fresh training (see RunLayout.training_name)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train_worker import train_loop_per_worker

    config = with_absolute_paths(config)
    layout = RunLayout(config)
    root = layout.dataset_root
    manifest = preflight(config, root)
    init_package, init_lineage = _init_package(config, manifest, root)
    name = layout.training_name(manifest["dataset_id"], salt=salt)
    _check_checkpoint_format(layout, name)
    parent_run_id = _parent_run(
        config, manifest, name=name, workflow_run_id=workflow_run_id, extra_tags=init_lineage
    )
    resources = config.train.resources
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_plain(config),
            "parent_run_id": parent_run_id,
            "dataset_root": str(root),
            "init_package": str(init_package) if init_package else "",
        },
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": resources.cpus_per_worker,
                "GPU": resources.gpus_per_worker,
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=layout.train_storage,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            # Rank 0 logs to MLflow: workers on other hosts need the driver's credentials.
            worker_runtime_env={"env_vars": forwarded_environment()},
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with ray_session(config.run, temp_root=layout.root):
        with stage_progress(config, parent_run_id=parent_run_id):
            result = trainer.fit()
    _close_parent(config, parent_run_id, failed=result.error is not None)
    if result.error is not None:
        raise result.error
    return TrainingRun(
        name=name,
        parent_run_id=parent_run_id,
        dataset_id=manifest["dataset_id"],
        dataset_version=int(manifest["version"]),
        result=result,
    )


class DatasetModelMismatchError(ValueError):
    """The dataset was encoded by a different Qwen2-VL than the one training would replay."""


def preflight(config: PipelineConfig, root: Path) -> dict:
    """Check everything a worker would trip over, before any run, folder or MLflow entry is
    made: the manifest and every shard (format, counts), both checkpoints, and that the data
    was encoded by the Qwen2-VL whose last layer training replays. Returns the manifest."""
    from components.checkpoints import resolve_checkpoint
    from components.training.loader import BucketIndex

    manifest = shard_format.read_manifest(root)
    BucketIndex.from_dataset(root)
    encode = config.data.encode
    resolve_checkpoint(
        encode.flux, revision=encode.flux_revision, root_file="model_index.json", required=()
    )
    qwen = resolve_checkpoint(
        encode.qwen2vl, revision=encode.qwen2vl_revision, root_file="config.json", required=()
    )
    encoded_with = manifest.get("encoders", {}).get("qwen2vl_revision")
    if encoded_with != qwen.revision_id:
        raise DatasetModelMismatchError(
            f"{root / shard_format.MANIFEST_NAME}: shards were encoded by Qwen2-VL revision "
            f"{encoded_with}, but training would replay the last layer of {encode.qwen2vl} "
            f"(revision {qwen.revision_id}); re-encode the data or point data.encode.qwen2vl "
            "at the checkpoint that encoded it"
        )
    if config.train.text_branch == "t5" and not shard_format.has_t5_caption(manifest):
        raise DatasetModelMismatchError(
            f'{root / shard_format.MANIFEST_NAME}: train.text_branch = "t5" trains on the '
            "captions' T5 states, and this dataset has none: encode it with "
            "data.encode.t5_caption = true"
        )
    return manifest


def _init_package(config: PipelineConfig, manifest: dict, root: Path):
    """(package folder, lineage tags) of train.init_from, checked against the dataset; (None,
    {}) without it."""
    from pipelines.init_from import check_init_package, resolve_init_package

    package = resolve_init_package(config)
    if package is None:
        return None, {}
    lineage = check_init_package(package, manifest, dataset_root=root)
    return package, {"init_from": config.train.init_from, **lineage}


def _check_checkpoint_format(layout: RunLayout, name: str) -> None:
    """Checkpoints an older trainer wrote in this run's storage would fail in every worker
    (and be retried max_failures times): refuse them here, once, by name."""
    from components.training.checkpoint_state import check_format

    for folder, state in layout.checkpoint_states(name):
        check_format(folder, state)


def _parent_run(
    config: PipelineConfig,
    manifest: dict,
    *,
    name: str,
    workflow_run_id: str | None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """The parent run of this training: reopened from its marker on resume."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    marker = RunLayout(config).training_marker(name)
    client = MlflowClient(tracking_uri=tracking_uri(config))
    if marker.exists():
        run_id = json.loads(marker.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    version = code_version()
    tags = {
        "git_sha": version["git_sha"],
        "config_hash": config_hash(config),
        "data_manifest_id": str(manifest.get("dataset_id", "")),
        "dataset_version": str(manifest.get("version", "")),
        "preset": config.run.name,
        "training": name,
        **(extra_tags or {}),
    }
    if workflow_run_id:
        tags |= {"mlflow.parentRunId": workflow_run_id, "workflow_step": "train"}
    run = client.create_run(
        experiment_id(client, config), run_name=f"{name}-{version['git_sha']}", tags=tags
    )
    params = [Param(key, str(value)[:6000]) for key, value in flatten(config).items()]
    params += [Param(f"source_share.{name}", f"{share:.6g}") for name, share in _shares(manifest)]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    shard_format.write_json_atomic(
        marker,
        {
            "run_id": run.info.run_id,
            "config_hash": config_hash(config.train),
            "dataset_id": manifest.get("dataset_id"),
            "dataset_version": manifest.get("version"),
        },
    )
    return run.info.run_id


def _shares(manifest: dict) -> list[tuple[str, float]]:
    """The share of steps each source gets (weight over the weights of sources with samples;
    components/training/step_plan.py draws by it)."""
    sources = [s for s in manifest.get("sources", []) if s.get("counts", {}).get("encoded")]
    total = sum(float(source["weight"]) for source in sources)
    return [(source["name"], float(source["weight"]) / total) for source in sources]


def _close_parent(config: PipelineConfig, run_id: str, *, failed: bool) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(config))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
