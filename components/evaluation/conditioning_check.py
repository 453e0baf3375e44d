"""The gate's conditioning check: does the model generate what its conditioning names?

Classes are words the captions name through a pattern (on the demo corpus, the background
colour: "... on a red background"). The references are the dataset's own encoded rows: the class
centroid is the mean, over the rows whose caption names the class, of each raw VAE latent's
per-channel spatial mean (16 numbers). A check generates per class and classifies each sample
by its nearest centroid:
  - "text": text-to-image from `prompt_template` with the class word, `seeds_per_class` seeds,
    through the Generator (the path `qwenflux generate` runs);
  - "variation": image-only conditioning on reference rows of the class, from their cached
    Qwen2-VL states (what training's validation grid samples).
Samples and centroids are both centred (their means over the classes subtracted) and compared by
cosine similarity: a briefly trained flow model's samples shrink towards the data mean, so raw
nearest-centroid puts them all in the class nearest the mean; centred, the check asks whether
the conditioning moves a sample towards its class. Chance is 1 / number of classes; a check
passes at accuracy >= chance + `min_margin`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CHECK_MODES = ("text", "variation")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConditioningCheckConfig:
    """Which conditioning checks the gate runs and what they must reach."""

    modes: tuple[str, ...] = ()
    """Checks to run ("text", "variation"); empty = none (datasets without class words)."""
    class_words: tuple[str, ...] = ()
    """The class vocabulary, e.g. the demo corpus's nine colours."""
    caption_pattern: str = ""
    """Regex with {word}: a row belongs to the class whose word makes it match its caption."""
    prompt_template: str = ""
    """Text check prompt with {word}, e.g. "a white circle in the center on a {word} background"."""
    seeds_per_class: int = 2
    """Text check: generations per class."""
    references_per_class: int = 4
    """Variation check: reference rows per class (fewer if the dataset has fewer)."""
    num_steps: int = 8
    """Euler steps per generation."""
    text_cfg_scale: float = 1.0
    """Classifier-free guidance scale of the text check's generations (1 = off, as the released
    model samples)."""
    variation_cfg_scale: float = 1.0
    """The same for the variation check. Guidance amplifies what the conditional and the
    unconditional predictions disagree on, which helps a briefly trained model's weak signal
    (tiny demo: variation 0.19 without, 0.35 at 3) but need not (its text: 0.33 without, 0.31
    at 3), hence one scale per check."""
    min_margin: float = 0.15
    """A check passes when its accuracy is at least chance (1 / classes) plus this."""

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in CHECK_MODES]
        if unknown:
            raise ValueError(f"modes: unknown {unknown}; known: {list(CHECK_MODES)}")
        if self.modes and len(set(self.class_words)) < 2:
            raise ValueError("class_words: a check needs at least two distinct classes")
        if self.modes and "{word}" not in self.caption_pattern:
            raise ValueError("caption_pattern must contain {word}")
        if "text" in self.modes and "{word}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {word} for the text check")
        if min(self.seeds_per_class, self.references_per_class, self.num_steps) < 1:
            raise ValueError("seeds_per_class, references_per_class and num_steps must be >= 1")
        for name in ("text_cfg_scale", "variation_cfg_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_margin < 1.0:
            raise ValueError("min_margin must lie in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckResult:
    """One check's verdict: accuracy over `num_samples` generations against chance."""

    mode: str
    accuracy: float
    chance: float
    min_margin: float
    num_samples: int
    predictions: tuple[tuple[str, str], ...]
    """(true class, predicted class) per generation."""
    skipped_classes: tuple[str, ...] = ()
    """Configured classes no reference row names; left out of the check (and of chance)."""

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.chance + self.min_margin

    def message(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"conditioning check {self.mode} {verdict}: accuracy {self.accuracy:.2f} over "
            f"{self.num_samples} generations vs chance {self.chance:.2f} "
            f"(needs >= {self.chance + self.min_margin:.2f})"
            + (f"; no references for {list(self.skipped_classes)}" if self.skipped_classes else "")
        )


def caption_class(caption: str, config: ConditioningCheckConfig) -> str | None:
    """The class word the caption names through the pattern; None when it names none or several."""
    found = [
        word
        for word in config.class_words
        if re.search(config.caption_pattern.replace("{word}", re.escape(word)), caption)
    ]
    return found[0] if len(found) == 1 else None


def present_classes(
    labels: Sequence[str], config: ConditioningCheckConfig
) -> ConditioningCheckConfig:
    """The config narrowed to the classes some reference names (at least two are needed)."""
    present = tuple(word for word in config.class_words if word in labels)
    if len(present) < 2:
        raise ValueError(
            f"conditioning check: the dataset's captions name {list(present)} of "
            f"{list(config.class_words)} through {config.caption_pattern!r}; at least two needed"
        )
    return dataclasses.replace(config, class_words=present)


def latent_feature(raw_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean of raw VAE latents: [..., C, H, W] -> [..., C] float32."""
    return raw_BCHW.float().mean(dim=(-2, -1))


def class_centroids(
    features_NC: torch.Tensor, labels: Sequence[str], class_words: Sequence[str]
) -> torch.Tensor:
    """Mean feature per class word, [K, C]; every class needs at least one reference."""
    missing = [word for word in class_words if word not in labels]
    if missing:
        raise ValueError(f"conditioning check: no reference rows for classes {missing}")
    rows = [features_NC[[label == word for label in labels]].mean(dim=0) for word in class_words]
    return torch.stack(rows)


def classify_centred(features_NC: torch.Tensor, centroids_KC: torch.Tensor) -> torch.Tensor:
    """Index of the most similar centroid per sample, both sets centred (see the module doc)."""
    samples = torch.nn.functional.normalize(features_NC - features_NC.mean(dim=0), dim=1)
    classes = torch.nn.functional.normalize(centroids_KC - centroids_KC.mean(dim=0), dim=1)
    return (samples @ classes.T).argmax(dim=1)


def score(
    mode: str,
    features_NC: torch.Tensor,
    truth: Sequence[str],
    *,
    centroids_KC: torch.Tensor,
    config: ConditioningCheckConfig,
) -> CheckResult:
    """Classify generated features and compare with the classes they were asked for."""
    predicted = [config.class_words[int(i)] for i in classify_centred(features_NC, centroids_KC)]
    pairs = tuple(zip(truth, predicted, strict=True))
    return CheckResult(
        mode=mode,
        accuracy=sum(true == guess for true, guess in pairs) / len(pairs),
        chance=1.0 / len(config.class_words),
        min_margin=config.min_margin,
        num_samples=len(pairs),
        predictions=pairs,
    )


def text_check(
    generate_latents: Callable[[str, int], torch.Tensor],
    *,
    centroids_KC: torch.Tensor,
    config: ConditioningCheckConfig,
) -> CheckResult:
    """Text-to-image per class word and seed; generate_latents(prompt, seed) -> raw [1, C, h, w].

    Features are centred per seed: one seed's noise moves every class's sample alike, and that
    shared part says nothing about the prompt."""
    prompts = [config.prompt_template.replace("{word}", word) for word in config.class_words]
    features, truth = [], []
    for seed in range(config.seeds_per_class):
        one_seed = torch.cat([latent_feature(generate_latents(p, seed)) for p in prompts])
        features.append(one_seed - one_seed.mean(dim=0))
        truth += list(config.class_words)
    return score("text", torch.cat(features), truth, centroids_KC=centroids_KC, config=config)
