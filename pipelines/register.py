"""After training: the model package, the evaluation gate, and the registry version.

    qwenflux register --config tiny      (make demo runs it after training)
    qwenflux promote --config tiny [--version N]

`run_registration(config)` (of the training of the current dataset, or the one named):
1. finds the training's final checkpoint (last stage, last step) in `train.storage_path` (a
   copy in <run.root>/train-cache/ when that is on object storage);
2. exports the model package (components/inference/package.py) to <run.root>/packages/<parent run>;
3. evaluates the gate (components/evaluation/gate.py) on the package as loaded back (what
   would ship) against the untrained start: held-out validation loss and conditioning checks;
   a registered champion of another training is measured on the same held-out rows, for
   promotion to compare like with like;
4. logs the gate into the training's MLflow parent run and, only if it passed, registers the
   package as a new version of `registry.model_name` with alias `candidate` and lineage tags.
Rerunning does not register twice: the version whose training_run_id tag is this training's is
reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import PipelineConfig
from pipelines.run_layout import RunLayout, with_absolute_paths
from pipelines.train_tracking import metric_entities, tracking_uri

if TYPE_CHECKING:
    from components.evaluation.gate import GateResult


class TrainingNotFinishedError(RuntimeError):
    """No final checkpoint (or no training parent run) to register from."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistrationResult:
    gate: GateResult
    package_dir: Path
    model_name: str
    version: str | None
    """The registered version; None when the gate failed."""
    training_run_id: str

    def format(self) -> str:
        lines = [self.gate.message(), f"package: {self.package_dir}"]
        if self.version is None:
            lines.append("not registered (the gate failed)")
        else:
            lines.append(f"registered: models:/{self.model_name}/{self.version} (@candidate)")
        return "\n".join(lines)


def final_checkpoint(config: PipelineConfig, training: str) -> Path:
    """The latest checkpoint folder whose state says the last stage's last step is done (read
    back into the run directory when it is on object storage)."""
    layout = RunLayout(config)
    storage = layout.train_storage
    last = len(config.train.stages) - 1
    final_steps = config.train.stages[-1].num_steps
    found = [
        folder
        for folder, state in layout.checkpoint_states(training)
        if state.get("stage_index") == last and state.get("next_step") == final_steps
    ]
    if not found:
        raise TrainingNotFinishedError(
            f"no final checkpoint (stage {last + 1}, step {final_steps}) of training "
            f"{training} under {storage}: run `qwenflux train` with this config first"
        )
    if layout.is_storage_local:
        return found[-1]
    from pipelines.storage import download_folder

    uri = str(found[-1])
    return download_folder(uri, layout.train_cache(training) / uri.rsplit("/", 1)[-1])


def training_run_id(config: PipelineConfig, training: str) -> str:
    marker = RunLayout(config).training_marker(training)
    if not marker.is_file():
        raise TrainingNotFinishedError(
            f"{marker} is missing: training {training} never ran in {config.run.root}"
        )
    return json.loads(marker.read_text())["run_id"]


def run_registration(config: PipelineConfig, *, training: str | None = None) -> RegistrationResult:
    """Export, gate and (if passed) register; see the module docstring."""
    from mlflow.tracking import MlflowClient

    from components.inference.package import export_package, load_package

    config = with_absolute_paths(config)
    training = training or RunLayout(config).current_training_name()
    checkpoint = final_checkpoint(config, training)
    run_id = training_run_id(config, training)
    client = MlflowClient(tracking_uri(config))
    lineage = _lineage(client, run_id)
    package_dir = RunLayout(config).package_dir(run_id, weights=config.registry.weights)
    if not (package_dir / "package.json").is_file():
        encode = config.data.encode
        export_package(
            checkpoint_dir=checkpoint,
            qwen2vl=encode.qwen2vl,
            qwen2vl_revision=encode.qwen2vl_revision,
            flux=encode.flux,
            flux_revision=encode.flux_revision,
            settings=generator_settings(config),
            lineage=lineage,
            out_dir=package_dir,
            t5_embedder=_carried_t5_embedder(config),
            weights=config.registry.weights,
        )
    champion_version, champion = _champion_to_compare(config, run_id)
    gate = evaluate_gate(config, load_package(package_dir), champion=champion)
    gate_metrics = {f"gate.{key}": value for key, value in gate.metrics().items()}
    client.log_batch(run_id, metrics=metric_entities(gate_metrics, step=0))
    version = None
    if gate.passed:
        version = _existing_version(client, config.registry.model_name, run_id)
        if version is None:
            from components.inference.registry import register_model

            version = register_model(
                package_dir=package_dir,
                tracking_uri=tracking_uri(config),
                model_name=config.registry.model_name,
                run_id=run_id,
                gate=gate.metrics(),
                tags=lineage | ({"gate.champion_version": champion_version} if champion else {}),
            )
    return RegistrationResult(
        gate=gate,
        package_dir=package_dir,
        model_name=config.registry.model_name,
        version=version,
        training_run_id=run_id,
    )


def generator_settings(config: PipelineConfig):
    """How the data was encoded and the model trained, from the dataset's manifest."""
    from components.data import shard_format
    from components.inference.generator_parts import GeneratorSettings

    manifest = shard_format.read_manifest(RunLayout(config).dataset_root)
    encoders = manifest.get("encoders", {})
    scaling, shift = shard_format.vae_factors(manifest)
    return GeneratorSettings(
        instruction=str(encoders["instruction"]),
        image_tokens=int(encoders["image_tokens"]),
        vae_scaling_factor=scaling,
        vae_shift_factor=shift,
        guidance=config.train.objective.guidance,
        text_branch=config.train.text_branch,
    )


def gate_inputs(config: PipelineConfig):
    """The gate's inputs from this run's config and dataset."""
    from components.evaluation.gate import GateInputs

    return GateInputs(
        dataset_root=RunLayout(config).dataset_root,
        objective=config.train.objective,
        num_validation_samples=config.train.num_validation_samples,
        min_improvement=config.registry.min_improvement,
        conditioning=config.registry.conditioning,
    )


def current_champion(config: PipelineConfig):
    """The registered model version with alias `champion`, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from components.inference.registry import CHAMPION_ALIAS

    client = MlflowClient(tracking_uri(config))
    try:
        return client.get_model_version_by_alias(config.registry.model_name, CHAMPION_ALIAS)
    except MlflowException:
        return None


def _champion_to_compare(config: PipelineConfig, run_id: str):
    """(version, networks) of the champion when it is another training's, else (None, None)."""
    from components.inference.registry import load_parts
    from components.training.objective import QwenFluxModel

    champion = current_champion(config)
    if champion is None or champion.tags.get("training_run_id") == run_id:
        return None, None
    version = str(champion.version)
    parts = load_parts(
        f"models:/{config.registry.model_name}/{version}",
        tracking_uri=tracking_uri(config),
        cache_dir=RunLayout(config).registry_cache,
    )
    return version, QwenFluxModel(parts.tail, parts.connector, parts.transformer)


def evaluate_gate(config: PipelineConfig, parts, *, champion=None) -> GateResult:
    """The gate (components/evaluation/gate.py) on `parts` against this run's untrained start
    (and `champion`, when given, on the same held-out rows)."""
    from components.evaluation import gate
    from components.training.model_loading import load_training_model
    from pipelines.init_from import resolve_init_package

    base, convention = load_training_model(
        config.data.encode,
        dataset_root=RunLayout(config).dataset_root,
        seed=config.run.seed,
        init_from=resolve_init_package(config),
    )
    return gate.evaluate_gate(
        parts, base=base, convention=convention, inputs=gate_inputs(config), champion=champion
    )


def run_promotion(config: PipelineConfig, *, version: str | None = None):
    """`candidate` (or `version`) -> `champion` if its gate loss beats the champion's."""
    from mlflow.exceptions import MlflowException

    from components.inference.registry import promote
    from pipelines.tracking_access import permission_denied

    uri = tracking_uri(config)
    try:
        return promote(tracking_uri=uri, model_name=config.registry.model_name, version=version)
    except MlflowException as error:
        action = f"move the aliases of {config.registry.model_name}"
        raise permission_denied(error, action=action, tracking_uri=uri) from error


def _carried_t5_embedder(config: PipelineConfig) -> Path | None:
    """The init_from package's T5 embedder, when it has one (see export_package)."""
    from components.inference.package import T5_EMBEDDER_FILE
    from pipelines.init_from import resolve_init_package

    package = resolve_init_package(config)
    if package is None or not (package / T5_EMBEDDER_FILE).is_file():
        return None
    return package / T5_EMBEDDER_FILE


def _lineage(client, run_id: str) -> dict[str, str]:
    tags = client.get_run(run_id).data.tags
    lineage = {"training_run_id": run_id}
    keys = ("git_sha", "config_hash", "data_manifest_id", "dataset_version", "preset")
    for key in (*keys, "init_from", "init_from_package", "init_from_imported"):
        if key in tags:
            lineage[key] = tags[key]
    return lineage


def _existing_version(client, model_name: str, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get("training_run_id") == run_id:
            return str(version.version)
    return None
