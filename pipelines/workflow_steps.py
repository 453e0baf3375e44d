"""The workflow's steps: data -> train -> register (the gate) -> promote -> infer.

Each step names the config it depends on (its fingerprint) and the steps whose outputs it reads,
and runs the same pipeline function as its single-step command. Outputs are small JSON values:

    data      dataset_id, dataset_version, manifest, source_rows, new_rows, new_encoded, encoded,
              rejected
    train     training (Ray Train run name), training_run_id (MLflow), dataset_id,
              dataset_version, checkpoint
    register  model_name, version (None when the gate refused), gate_passed, gate metrics
    promote   champion (version or None), promoted (the candidate is champion), candidate
    infer     model (models:/NAME/VERSION), out_dir, total, ok, failed
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from components.checkpoints import hash_file
from pipelines.config import PipelineConfig
from pipelines.config_loading import config_hash
from pipelines.run_layout import RunLayout
from pipelines.workflow import Step, StepContext, StepResult


def _data_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    from pipelines.config_loading import to_plain
    from pipelines.data_sources import lists_fingerprint, state_fingerprint

    if config.train.dataset:
        return {"external_dataset": config.train.dataset}
    return {
        "data": state_fingerprint(config.data),
        "seed": config.run.seed,
        "sources": [to_plain(source) for source in config.data.sources],
        "lists": lists_fingerprint(config.data),
    }


def _run_data(context: StepContext) -> StepResult:
    from components.data import shard_format
    from pipelines.data import run_data

    config = context.config
    layout = RunLayout(config)
    summary = None
    if not config.train.dataset:
        summary = run_data(config)
    manifest = shard_format.read_manifest(layout.dataset_root)
    outputs = {
        "dataset_id": manifest["dataset_id"],
        "dataset_version": int(manifest["version"]),
        "manifest": str(layout.dataset_root / shard_format.MANIFEST_NAME),
        "encoded": int(manifest["counts"]["encoded"]),
    }
    if summary is not None:
        rejected = sum(sum(reasons.values()) for reasons in summary.rejected.values())
        outputs |= {
            "source_rows": summary.source_rows,
            "new_rows": summary.new_rows,
            "new_encoded": summary.new_encoded,
            "rejected": rejected,
        }
    text = summary.format() if summary is not None else f"external dataset {layout.dataset_root}"
    if summary is not None:
        text += "\n" + _inspect(context, layout, version=outputs["dataset_version"])
    return StepResult(outputs=outputs, summary=text)


def _inspect(context: StepContext, layout: RunLayout, *, version: int) -> str:
    """The dataset's picture (a contact sheet per bucket, a counts chart) in the run directory
    and on the data step's MLflow run."""
    from pipelines.data_inspect import inspect_dataset, log_inspection

    report = inspect_dataset(layout.root, version=version, seed=context.config.run.seed)
    log_inspection(report, run_id=context.mlflow_run_id, tracking_uri=layout.tracking_uri)
    return f"contact sheets: {report.out_dir} ({len(report.sheets)} buckets + counts.png)"


def _train_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    train = replace(config.train, dataset="", storage_path="")
    return {"train": config_hash(train), "encode": config_hash(config.data.encode)}


def _run_train(context: StepContext) -> StepResult:
    from pipelines.storage import checkpoint_uri
    from pipelines.train import run_training

    # A forced (--from) run trains afresh, under a name salted with the workflow run's id.
    salt = context.run_id if context.forced else ""
    training = run_training(context.config, workflow_run_id=context.mlflow_run_id, salt=salt)
    outputs = {
        "training": training.name,
        "training_run_id": training.parent_run_id,
        "dataset_id": training.dataset_id,
        "dataset_version": training.dataset_version,
        "checkpoint": checkpoint_uri(training.result.checkpoint),
    }
    return StepResult(outputs=outputs, summary=f"training {training.name}")


def _run_register(context: StepContext) -> StepResult:
    from pipelines.register import run_registration

    result = run_registration(context.config, training=context.upstream["train"]["training"])
    outputs = {
        "model_name": result.model_name,
        "version": result.version,
        **{f"gate_{key}": value for key, value in result.gate.metrics().items() if key != "passed"},
        "gate_passed": result.gate.passed,
    }
    return StepResult(outputs=outputs, summary=result.format())


def _run_promote(context: StepContext) -> StepResult:
    from pipelines.register import current_champion, run_promotion

    config = context.config
    candidate = context.upstream["register"]["version"]
    if candidate is None:
        found = current_champion(config)
        champion = str(found.version) if found is not None else None
        outputs = {"candidate": None, "promoted": False, "champion": champion}
        return StepResult(outputs=outputs, summary="nothing to promote: the gate refused it")
    decision = run_promotion(config, version=candidate)
    champion = candidate if decision.promoted else decision.champion_version
    # "promoted": the candidate is champion after the step (also when an earlier, killed
    # attempt had already moved the alias), so a rerun's outputs equal an uninterrupted run's.
    outputs = {"candidate": candidate, "promoted": champion == candidate, "champion": champion}
    return StepResult(outputs=outputs, summary=decision.message)


def _infer_not_needed(config: PipelineConfig) -> str:
    return "" if config.infer.requests_file else "no infer.requests_file in the config"


def _infer_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    requests = config.infer.requests_file
    return {
        "infer": config_hash(config.infer),
        "requests_sha256": hash_file(Path(requests)) if requests else "",
    }


def _run_infer(context: StepContext) -> StepResult:
    from pipelines.infer import run_inference

    config = context.config
    champion = context.upstream["promote"]["champion"]
    if champion is None:
        raise RuntimeError(
            f"batch inference needs a champion of {config.registry.model_name}; none exists yet "
            "(no version has passed the gate)"
        )
    requests = Path(config.infer.requests_file)
    out_dir = RunLayout(config).inference / f"v{champion}-{hash_file(requests)[:8]}"
    model = f"models:/{config.registry.model_name}/{champion}"
    summary = run_inference(config, model=model, requests=requests, out_dir=out_dir)
    outputs = {
        "model": model,
        "out_dir": str(summary.out_dir),
        "total": summary.total,
        "ok": summary.ok,
        "failed": summary.failed,
    }
    return StepResult(outputs=outputs, summary=summary.format())


STEPS = (
    Step(name="data", reads=(), fingerprint=_data_fingerprint, run=_run_data),
    Step(name="train", reads=("data",), fingerprint=_train_fingerprint, run=_run_train),
    Step(
        name="register",
        reads=("train",),
        fingerprint=lambda config: {"registry": config_hash(config.registry)},
        run=_run_register,
    ),
    Step(
        name="promote",
        reads=("register",),
        fingerprint=lambda config: {"model_name": config.registry.model_name},
        run=_run_promote,
    ),
    Step(
        name="infer",
        reads=("promote",),
        fingerprint=_infer_fingerprint,
        run=_run_infer,
        not_needed=_infer_not_needed,
    ),
)
"""Every step, in run order."""
