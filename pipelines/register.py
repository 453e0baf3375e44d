"""After training: the model package, the evaluation gate, and the registry version.

    qwenflux register --config tiny      (make demo runs it after training)
    qwenflux promote --config tiny [--version N]

`run_registration(config)`:
1. finds the training's final checkpoint (last stage, last step) in `train.storage_path`;
2. exports the model package (components/inference/package.py) to <run.root>/packages/<parent run>;
3. evaluates the gate on the package as loaded back (what would ship): the validation flow loss
   on the held-out rows training never saw (fixed sigmas, fixed noise, image-only conditioning)
   must be at least `registry.min_improvement` below the untrained start's on the same rows;
4. logs the gate into the training's MLflow parent run and, only if it passed, registers the
   package as a new version of `registry.model_name` with alias `candidate` and lineage tags.
Rerunning does not register twice: the version whose training_run_id tag is this training's is
reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import PipelineConfig
from pipelines.train import (
    dataset_root,
    local_checkpoint_states,
    storage_path,
    with_absolute_paths,
)
from pipelines.train_tracking import metric_entities, tracking_uri

if TYPE_CHECKING:
    from components.evaluation.conditioning_check import CheckResult

PARENT_MARKER = "train_parent_run.json"


class TrainingNotFinishedError(RuntimeError):
    """No final checkpoint (or no training parent run) to register from."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GateResult:
    """The evaluation gate's verdict and the numbers behind it."""

    passed: bool
    """The loss bar and every conditioning check passed."""
    validation_loss: float
    base_validation_loss: float
    improvement: float
    min_improvement: float
    per_sigma: dict[float, float]
    checks: tuple[CheckResult, ...] = ()
    """The conditioning checks `registry.conditioning.modes` asked for."""

    def message(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        loss_line = (
            f"gate {verdict}: held-out validation loss {self.validation_loss:.4f} vs untrained "
            f"{self.base_validation_loss:.4f} ({self.improvement:+.1%} better; "
            f"needs >= {self.min_improvement:.1%})"
        )
        return "\n".join([loss_line, *(f"  {check.message()}" for check in self.checks)])

    def metrics(self) -> dict[str, float]:
        metrics = {
            "validation_loss": self.validation_loss,
            "base_validation_loss": self.base_validation_loss,
            "improvement": self.improvement,
            "passed": float(self.passed),
        }
        for check in self.checks:
            metrics[f"conditioning_{check.mode}_accuracy"] = check.accuracy
            metrics[f"conditioning_{check.mode}_chance"] = check.chance
        return metrics


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


def final_checkpoint(config: PipelineConfig) -> Path:
    """The latest checkpoint folder whose state says the last stage's last step is done."""
    storage = storage_path(config)
    if "://" in storage:
        raise NotImplementedError(
            f"train.storage_path {storage}: registration reads local checkpoints only so far"
        )
    last = len(config.train.stages) - 1
    final_steps = config.train.stages[-1].num_steps
    found = [
        folder
        for folder, state in local_checkpoint_states(config)
        if state.get("stage_index") == last and state.get("next_step") == final_steps
    ]
    if not found:
        raise TrainingNotFinishedError(
            f"no final checkpoint (stage {last + 1}, step {final_steps}) under {storage}: "
            "run `qwenflux train` with this config first"
        )
    return found[-1]


def training_run_id(config: PipelineConfig) -> str:
    marker = Path(config.run.root) / PARENT_MARKER
    if not marker.is_file():
        raise TrainingNotFinishedError(f"{marker} is missing: no training ran in {config.run.root}")
    return json.loads(marker.read_text())["run_id"]


def run_registration(config: PipelineConfig) -> RegistrationResult:
    """Export, gate and (if passed) register; see the module docstring."""
    from mlflow.tracking import MlflowClient

    from components.inference.package import export_package, load_package

    config = with_absolute_paths(config)
    checkpoint = final_checkpoint(config)
    run_id = training_run_id(config)
    client = MlflowClient(tracking_uri(config))
    lineage = _lineage(client, run_id)
    package_dir = Path(config.run.root) / "packages" / run_id
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
        )
    gate = evaluate_gate(config, load_package(package_dir))
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
                tags=lineage,
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
    from components.inference.generator import GeneratorSettings

    manifest = shard_format.read_manifest(dataset_root(config))
    encoders = manifest.get("encoders", {})
    scaling, shift = shard_format.vae_factors(manifest)
    return GeneratorSettings(
        instruction=str(encoders["instruction"]),
        image_tokens=int(encoders["image_tokens"]),
        vae_scaling_factor=scaling,
        vae_shift_factor=shift,
        guidance=config.train.objective.guidance,
    )


def evaluate_gate(config: PipelineConfig, parts) -> GateResult:
    """Held-out validation loss of the package's networks vs the untrained start's."""
    from components.training.loop import LoopData
    from components.training.model_loading import load_training_model
    from components.training.objective import QwenFluxModel, validation_losses

    root = dataset_root(config)
    base, convention = load_training_model(
        config.data.encode, dataset_root=root, seed=config.run.seed
    )
    batch = LoopData.from_dataset(
        root, num_validation_samples=config.train.num_validation_samples, device="cpu"
    ).validation_batch
    objective = config.train.objective
    trained = QwenFluxModel(parts.tail, parts.connector, parts.transformer)
    base_losses = validation_losses(base.eval(), batch, objective=objective, convention=convention)
    losses = validation_losses(trained.eval(), batch, objective=objective, convention=convention)
    loss, base_loss = _mean(losses), _mean(base_losses)
    improvement = 1.0 - loss / base_loss if base_loss > 0 else 0.0
    checks = conditioning_checks(config, parts, trained, convention=convention)
    passed = math.isfinite(loss) and improvement >= config.registry.min_improvement
    return GateResult(
        passed=passed and all(check.passed for check in checks),
        validation_loss=loss,
        base_validation_loss=base_loss,
        improvement=improvement,
        min_improvement=config.registry.min_improvement,
        per_sigma=losses,
        checks=checks,
    )


def conditioning_checks(config: PipelineConfig, parts, model, *, convention) -> tuple:
    """The text and variation checks of components/evaluation/conditioning_check.py on the
    dataset's rows (classes from their captions, centroids from their latents)."""
    import torch

    from components.evaluation import conditioning_check as probe

    configured = config.registry.conditioning
    if not configured.modes:
        return ()
    by_bucket = _labelled_samples(dataset_root(config), configured)
    pairs = [pair for rows in by_bucket.values() for pair in rows]
    check = probe.present_classes([label for _, label in pairs], configured)
    skipped = tuple(word for word in configured.class_words if word not in check.class_words)
    centroids = probe.class_centroids(
        torch.stack([probe.latent_feature(sample["vae_latent"]) for sample, _ in pairs]),
        [label for _, label in pairs],
        check.class_words,
    )
    results = []
    if "text" in check.modes:
        generate = _text_generation(parts, size=_largest_bucket_size(by_bucket), check=check)
        results.append(probe.text_check(generate, centroids_KC=centroids, config=check))
    if "variation" in check.modes:
        features, truth = _variation_features(
            config, model, by_bucket, check=check, convention=convention
        )
        results.append(
            probe.score("variation", features, truth, centroids_KC=centroids, config=check)
        )
    return tuple(dataclasses.replace(result, skipped_classes=skipped) for result in results)


def _text_generation(parts, *, size: tuple[int, int], check):
    """generate(prompt, seed) -> raw latents [1, C, h, w] through the Generator (text mode)."""
    from components.inference.generator import Generator
    from components.inference.request_schema import GenerationRequest

    generator = Generator(parts)
    width, height = size

    def generate(prompt: str, seed: int):
        request = GenerationRequest(
            mode="text",
            width=width,
            height=height,
            prompt=prompt,
            seed=seed,
            steps=check.num_steps,
            cfg_scale=check.text_cfg_scale,
        )
        return generator.generate_latents(request)

    return generate


def _variation_features(config: PipelineConfig, model, by_bucket, *, check, convention):
    """Image-only generations from `references_per_class` rows per class and bucket: their
    features [N, C] and the classes they were drawn from."""
    import torch

    from components.evaluation.conditioning_check import latent_feature
    from components.training.loader import collate_samples
    from components.training.objective import validation_samples

    features, truth = [], []
    for rows in by_bucket.values():
        chosen = _per_class(rows, check.references_per_class)
        if chosen:
            batch = collate_samples([sample for sample, _ in chosen])
            generated = validation_samples(
                model,
                batch,
                objective=config.train.objective,
                convention=convention,
                cfg_scale=check.variation_cfg_scale,
            )
            features.append(latent_feature(generated))
            truth += [label for _, label in chosen]
    return torch.cat(features), truth


def _labelled_samples(root: Path, check) -> dict[str, list[tuple[dict, str]]]:
    from components.evaluation.conditioning_check import caption_class
    from components.training.loader import BucketIndex, ShardReader

    index, reader = BucketIndex.from_dataset(root), ShardReader()
    by_bucket = {}
    for bucket_id, bucket in sorted(index.buckets.items()):
        samples = reader.read_samples(bucket.locate(list(range(bucket.num_rows))))
        labelled = [(sample, caption_class(sample["caption"], check)) for sample in samples]
        by_bucket[bucket_id] = [(sample, label) for sample, label in labelled if label]
    return by_bucket


def _per_class(rows: list[tuple[dict, str]], limit: int) -> list[tuple[dict, str]]:
    """Up to `limit` rows of each class (this bucket's share; dataset order)."""
    taken: dict[str, int] = {}
    chosen = []
    for sample, label in rows:
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            chosen.append((sample, label))
    return chosen


def _largest_bucket_size(by_bucket: dict[str, list]) -> tuple[int, int]:
    """(width, height) of the bucket with the most labelled rows (bucket ids read WxH)."""
    bucket_id = max(by_bucket, key=lambda key: (len(by_bucket[key]), key))
    width, height = bucket_id.split("x")
    return int(width), int(height)


def run_promotion(config: PipelineConfig, *, version: str | None = None):
    """`candidate` (or `version`) -> `champion` if its gate loss beats the champion's."""
    from components.inference.registry import promote

    return promote(
        tracking_uri=tracking_uri(config),
        model_name=config.registry.model_name,
        version=version,
    )


def _lineage(client, run_id: str) -> dict[str, str]:
    tags = client.get_run(run_id).data.tags
    lineage = {"training_run_id": run_id}
    for key in ("git_sha", "config_hash", "data_manifest_id", "preset"):
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


def _mean(values: dict[Any, float]) -> float:
    return sum(values.values()) / len(values)
