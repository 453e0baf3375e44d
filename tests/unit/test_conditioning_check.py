"""The gate's conditioning check: class words from captions, centred nearest-centroid scoring."""

import dataclasses

import pytest
import torch

from components.evaluation.conditioning_check import (
    ConditioningCheckConfig,
    caption_class,
    class_centroids,
    classify_centred,
    latent_feature,
    present_classes,
    score,
    text_check,
)

pytestmark = pytest.mark.unit

COLOURS = ("red", "green", "blue")


def _config(**changes) -> ConditioningCheckConfig:
    values = {
        "modes": ("text",),
        "class_words": COLOURS,
        "caption_pattern": r"on an? {word} background",
        "prompt_template": "a white square in the center on a {word} background",
        "seeds_per_class": 3,
        "min_margin": 0.2,
    }
    return ConditioningCheckConfig(**(values | changes))


def _centroids() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(len(COLOURS), 16) * 2


def test_caption_class_reads_the_pattern_and_refuses_ambiguity():
    config = _config()
    assert caption_class("a red circle in the top left on a blue background", config) == "blue"
    assert caption_class("a blue circle on a red background", config) == "red"
    assert caption_class("a red circle on a purple background", config) is None
    # Word boundaries are the pattern's business: "greenish" does not match "green background".
    assert caption_class("a square on a greenish background", config) is None


def test_config_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="modes"):
        _config(modes=("caption",))
    with pytest.raises(ValueError, match="class_words"):
        _config(class_words=("red", "red"))
    with pytest.raises(ValueError, match="caption_pattern"):
        _config(caption_pattern="on a background")
    with pytest.raises(ValueError, match="prompt_template"):
        _config(prompt_template="no placeholder")
    assert ConditioningCheckConfig().modes == ()


def test_centroids_need_every_class():
    features = torch.arange(32.0).reshape(2, 16)
    centroids = class_centroids(features, ["red", "blue"], ("red", "blue"))
    assert torch.equal(centroids, features)
    with pytest.raises(ValueError, match="green"):
        class_centroids(features, ["red", "blue"], COLOURS)


def test_latent_feature_is_the_per_channel_spatial_mean():
    raw = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    assert torch.allclose(latent_feature(raw), raw.mean(dim=(2, 3)))


def test_shrunken_samples_still_classify_after_centring():
    # A briefly trained model's samples sit near the data mean, moved a little towards their
    # class: raw nearest-centroid misreads them; centred they classify.
    centroids = _centroids()
    mean = centroids.mean(dim=0)
    samples = mean + 0.05 * (centroids - mean) + 1.0
    assert torch.equal(classify_centred(samples, centroids), torch.arange(len(COLOURS)))
    raw_nearest = torch.cdist(samples, centroids).argmin(dim=1)
    assert not torch.equal(raw_nearest, torch.arange(len(COLOURS)))


def test_text_check_passes_a_model_that_follows_prompts_and_fails_one_that_ignores_them():
    centroids = _centroids()
    config = _config()
    prompts = []

    def following(prompt: str, seed: int) -> torch.Tensor:
        prompts.append((prompt, seed))
        word = next(word for word in COLOURS if f"a {word} background" in prompt)
        noise = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(seed))
        return (centroids[COLOURS.index(word)][:, None, None] + 0.3 * noise)[None]

    def ignoring(prompt: str, seed: int) -> torch.Tensor:
        return torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))

    good = text_check(following, centroids_KC=centroids, config=config)
    assert good.accuracy == 1.0 and good.passed and good.num_samples == 9
    assert prompts[:2] == [
        ("a white square in the center on a red background", 0),
        ("a white square in the center on a green background", 0),
    ]
    bad = text_check(ignoring, centroids_KC=centroids, config=config)
    # Same seed -> same sample whatever the prompt: one class per seed, accuracy = chance.
    assert bad.accuracy == pytest.approx(1 / 3) and not bad.passed
    assert "FAILED" in bad.message() and "chance 0.33" in bad.message()


def test_score_counts_against_chance_plus_margin():
    centroids = _centroids()
    features = centroids[[0, 1, 2, 0]]
    result = score(
        "variation",
        features,
        ["red", "green", "blue", "blue"],
        centroids_KC=centroids,
        config=_config(min_margin=0.4),
    )
    assert result.accuracy == 0.75 and result.chance == pytest.approx(1 / 3)
    assert result.passed  # 0.75 >= 0.333 + 0.4
    assert result.predictions[3] == ("blue", "red")


def test_classes_without_references_are_left_out_and_named():
    config = _config()
    narrowed = present_classes(["blue", "red", "blue"], config)
    assert narrowed.class_words == ("red", "blue")
    with pytest.raises(ValueError, match="at least two"):
        present_classes(["red", "red"], config)
    centroids = _centroids()[:2]
    result = score("text", centroids, ["red", "blue"], centroids_KC=centroids, config=narrowed)
    assert result.chance == 0.5
    skipped = dataclasses.replace(result, skipped_classes=("green",))
    assert "no references for ['green']" in skipped.message()
