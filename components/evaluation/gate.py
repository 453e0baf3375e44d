"""The evaluation gate: does a trained model earn a registry version?

Inputs: the model's networks as the package loads them (GeneratorParts), the untrained start
(QwenFluxModel) and the dataset's latent convention, and GateInputs (the dataset root, the
objective, how many rows training held out, the bar). Two bars, both must pass:
  - loss: the validation flow loss on the held-out rows training never saw (fixed sigmas, fixed
    noise, image-only conditioning) at least `min_improvement` below the untrained start's;
  - conditioning (components/evaluation/conditioning_check.py): generations land in the class
    their conditioning names, per configured mode ("text" through the Generator, "variation"
    through the training validation sampler).
Output: GateResult (verdict, numbers, one message line per check).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.evaluation import conditioning_check as probe
from components.evaluation.conditioning_check import CheckResult, ConditioningCheckConfig
from components.inference.generator import Generator
from components.inference.generator_parts import GeneratorParts
from components.inference.request_schema import GenerationRequest
from components.training.loader import BucketIndex, ShardReader, collate_samples
from components.training.loop import LoopData
from components.training.objective import (
    LatentConvention,
    ObjectiveConfig,
    QwenFluxModel,
    validation_losses,
    validation_samples,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class GateInputs:
    """What the gate reads besides the models."""

    dataset_root: Path
    """The dataset the model trained on (manifest + shards)."""
    objective: ObjectiveConfig
    """The training objective (guidance, validation sigmas)."""
    num_validation_samples: int
    """Rows training held out (the same split: components/training/loop.py::hold_out)."""
    min_improvement: float
    """Loss bar: fraction below the untrained start's validation loss."""
    conditioning: ConditioningCheckConfig
    """Conditioning bar (no checks when its modes are empty)."""


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
    """The conditioning checks `conditioning.modes` asked for."""
    champion_validation_loss: float | None = None
    """The current champion's loss on the same held-out rows (None: no champion to compare);
    promotion compares with it, as another dataset version holds out other rows."""

    def message(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        loss_line = (
            f"gate {verdict}: held-out validation loss {self.validation_loss:.4f} vs untrained "
            f"{self.base_validation_loss:.4f} ({self.improvement:+.1%} better; "
            f"needs >= {self.min_improvement:.1%})"
        )
        lines = [loss_line, *(f"  {check.message()}" for check in self.checks)]
        if self.champion_validation_loss is not None:
            lines.append(
                f"  the champion on the same held-out rows: {self.champion_validation_loss:.4f}"
            )
        return "\n".join(lines)

    def metrics(self) -> dict[str, float]:
        metrics = {
            "validation_loss": self.validation_loss,
            "base_validation_loss": self.base_validation_loss,
            "improvement": self.improvement,
            "passed": float(self.passed),
        }
        if self.champion_validation_loss is not None:
            metrics["champion_validation_loss"] = self.champion_validation_loss
        for check in self.checks:
            metrics[f"conditioning_{check.mode}_accuracy"] = check.accuracy
            metrics[f"conditioning_{check.mode}_chance"] = check.chance
        return metrics


def evaluate_gate(
    parts: GeneratorParts,
    *,
    base: QwenFluxModel,
    convention: LatentConvention,
    inputs: GateInputs,
    champion: QwenFluxModel | None = None,
) -> GateResult:
    """Both bars on the package's networks (see the module docstring); `champion` (the
    registered champion's networks) gets its loss measured on the same held-out batch."""
    batch = LoopData.from_dataset(
        inputs.dataset_root, num_validation_samples=inputs.num_validation_samples, device="cpu"
    ).validation_batch
    objective = inputs.objective
    trained = QwenFluxModel(parts.tail, parts.connector, parts.transformer)
    base_losses = validation_losses(base.eval(), batch, objective=objective, convention=convention)
    losses = validation_losses(trained.eval(), batch, objective=objective, convention=convention)
    loss, base_loss = _mean(losses), _mean(base_losses)
    champion_loss = None
    if champion is not None:
        champion_losses = validation_losses(
            champion.eval(), batch, objective=objective, convention=convention
        )
        champion_loss = _mean(champion_losses)
    improvement = 1.0 - loss / base_loss if base_loss > 0 else 0.0
    checks = conditioning_checks(parts, trained, convention=convention, inputs=inputs)
    passed = math.isfinite(loss) and improvement >= inputs.min_improvement
    return GateResult(
        passed=passed and all(check.passed for check in checks),
        validation_loss=loss,
        base_validation_loss=base_loss,
        improvement=improvement,
        min_improvement=inputs.min_improvement,
        per_sigma=losses,
        checks=checks,
        champion_validation_loss=champion_loss,
    )


def conditioning_checks(
    parts: GeneratorParts,
    model: QwenFluxModel,
    *,
    convention: LatentConvention,
    inputs: GateInputs,
) -> tuple[CheckResult, ...]:
    """The text and variation checks on the dataset's rows (classes from their captions,
    centroids from their latents)."""
    configured = inputs.conditioning
    if not configured.modes:
        return ()
    by_bucket = _labelled_samples(inputs.dataset_root, configured)
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
            model, by_bucket, check=check, objective=inputs.objective, convention=convention
        )
        results.append(
            probe.score("variation", features, truth, centroids_KC=centroids, config=check)
        )
    return tuple(dataclasses.replace(result, skipped_classes=skipped) for result in results)


def _text_generation(parts: GeneratorParts, *, size: tuple[int, int], check):
    """generate(prompt, seed) -> raw latents [1, C, h, w] through the Generator (text mode)."""
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


def _variation_features(model, by_bucket, *, check, objective, convention):
    """Image-only generations from `references_per_class` rows per class and bucket: their
    features [N, C] and the classes they were drawn from."""
    features, truth = [], []
    for rows in by_bucket.values():
        chosen = _per_class(rows, check.references_per_class)
        if chosen:
            batch = collate_samples([sample for sample, _ in chosen])
            generated = validation_samples(
                model,
                batch,
                objective=objective,
                convention=convention,
                cfg_scale=check.variation_cfg_scale,
            )
            features.append(probe.latent_feature(generated))
            truth += [label for _, label in chosen]
    return torch.cat(features), truth


def _labelled_samples(root: Path, check) -> dict[str, list[tuple[dict, str]]]:
    index, reader = BucketIndex.from_dataset(root), ShardReader()
    by_bucket = {}
    for bucket_id, bucket in sorted(index.buckets.items()):
        samples = reader.read_samples(bucket.locate(list(range(bucket.num_rows))))
        labelled = [(sample, probe.caption_class(sample["caption"], check)) for sample in samples]
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


def _mean(values: dict[Any, float]) -> float:
    return sum(values.values()) / len(values)
