"""Aspect buckets: sizes worked out by hand, nearest-bucket choice, crop geometry, fit_to_bucket,
and the lossless raw-RGB packing a fitted image travels in."""

import math

import numpy as np
import pytest
from PIL import Image

from components.data.buckets import (
    Bucket,
    BucketConfig,
    aspect_distance,
    build_buckets,
    crop_fraction,
    fit_to_bucket,
    nearest_bucket,
    pack_fitted_image,
    unpack_fitted_image,
)

pytestmark = pytest.mark.unit

DEFAULT_BUCKETS = build_buckets(BucketConfig())


def _sizes(buckets: tuple[Bucket, ...]) -> dict[str, str]:
    return {bucket.aspect_name: bucket.bucket_id for bucket in buckets}


def test_default_buckets_at_1024_match_hand_computed_sizes():
    # 2.35:1: 1024 / 2.35 = 435.7; 432 gives aspect 2.370 (log error 0.009), 448 gives 2.286
    # (0.028), so 432 wins.
    assert _sizes(DEFAULT_BUCKETS) == {
        "1:2": "512x1024",
        "1:1": "1024x1024",
        "16:9": "1024x576",
        "2:1": "1024x512",
        "2.35:1": "1024x432",
    }
    assert [bucket.bucket_id for bucket in DEFAULT_BUCKETS] == [
        "512x1024",
        "1024x1024",
        "1024x576",
        "1024x512",
        "1024x432",
    ]
    square = DEFAULT_BUCKETS[1]
    assert (square.width_px, square.height_px) == (1024, 1024)


def test_ratios_that_round_to_one_size_are_a_config_error():
    # At 64 px in steps of 16, 16:9 (36 px -> 32, log error 0.118 vs 0.288 for 48), 2:1 and
    # 2.35:1 (27.2 px -> 32, 0.161 vs 0.532 for 16) would all be 64x32.
    with pytest.raises(ValueError, match="aspect_ratios 16:9 and 2:1 both round to 64x32"):
        BucketConfig(max_side_px=64)
    assert _sizes(build_buckets(BucketConfig(max_side_px=64, aspect_ratios=("1:1", "2:1")))) == {
        "1:1": "64x64",
        "2:1": "64x32",
    }


def test_buckets_at_128_keep_all_five_ratios():
    # 16:9 -> 72: 80 (log error 0.105) beats 64 (0.118); 2.35:1 -> 54.5: 48 (0.127) beats 64
    # (0.161).
    buckets = build_buckets(BucketConfig(max_side_px=128))
    assert _sizes(buckets) == {
        "1:2": "64x128",
        "1:1": "128x128",
        "16:9": "128x80",
        "2:1": "128x64",
        "2.35:1": "128x48",
    }


def test_buckets_at_64_with_multiple_8_keep_all_five_ratios():
    # 16:9 -> 36: 40 (log error 0.105) beats 32 (0.118); 2.35:1 -> 27.2: 24 (0.126) beats 32.
    buckets = build_buckets(BucketConfig(max_side_px=64, multiple_px=8))
    assert _sizes(buckets) == {
        "1:2": "32x64",
        "1:1": "64x64",
        "16:9": "64x40",
        "2:1": "64x32",
        "2.35:1": "64x24",
    }


@pytest.mark.parametrize(
    ("max_side_px", "multiple_px"), [(1000, 16), (512, 32), (100, 8), (2048, 64)]
)
def test_bucket_sides_are_multiples_and_within_max_side(max_side_px, multiple_px):
    for bucket in build_buckets(BucketConfig(max_side_px=max_side_px, multiple_px=multiple_px)):
        assert max(bucket.width_px, bucket.height_px) <= max_side_px
        assert bucket.width_px % multiple_px == 0 and bucket.height_px % multiple_px == 0
        assert bucket.bucket_id == f"{bucket.width_px}x{bucket.height_px}"


@pytest.mark.parametrize(
    ("width_px", "height_px", "expected"),
    [
        (1920, 1080, "1024x576"),
        (1080, 1920, "512x1024"),
        (1000, 1000, "1024x1024"),
        (3000, 1000, "1024x432"),
        (2100, 1000, "1024x512"),
        (1300, 1000, "1024x1024"),
        (1400, 1000, "1024x576"),
        (640, 1400, "512x1024"),
    ],
)
def test_nearest_bucket_by_log_aspect(width_px, height_px, expected):
    assert nearest_bucket(width_px, height_px, DEFAULT_BUCKETS).bucket_id == expected


def test_nearest_bucket_breaks_ties_deterministically():
    tall, wide = Bucket("32x64", "1:2", 32, 64), Bucket("64x32", "2:1", 64, 32)
    assert nearest_bucket(50, 50, (tall, wide)) is tall
    assert nearest_bucket(50, 50, (wide, tall)) is tall
    big_tall = Bucket("128x256", "1:2", 128, 256)
    assert nearest_bucket(50, 50, (wide, big_tall)) is big_tall


def test_aspect_distance_and_crop_fraction_agree_with_geometry():
    wide = next(bucket for bucket in DEFAULT_BUCKETS if bucket.aspect_name == "16:9")
    square = next(bucket for bucket in DEFAULT_BUCKETS if bucket.aspect_name == "1:1")
    assert aspect_distance(1920, 1080, wide) == pytest.approx(0.0, abs=1e-12)
    assert crop_fraction(1920, 1080, wide) == pytest.approx(0.0, abs=1e-12)
    assert aspect_distance(2000, 1000, square) == pytest.approx(math.log(2))
    assert crop_fraction(2000, 1000, square) == pytest.approx(0.5)
    assert crop_fraction(1000, 1300, square) == pytest.approx(1 - 1000 / 1300, abs=1e-3)


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="aspect_ratios"):
        BucketConfig(aspect_ratios=("16-9",))
    with pytest.raises(ValueError, match="aspect_ratios"):
        BucketConfig(aspect_ratios=("1:0",))
    with pytest.raises(ValueError, match="max_side_px"):
        BucketConfig(max_side_px=8)
    with pytest.raises(ValueError, match="max_crop_fraction"):
        BucketConfig(max_crop_fraction=1.0)
    with pytest.raises(ValueError, match="max_log_aspect_distance"):
        BucketConfig(max_log_aspect_distance=0.0)


def _three_bands(width_px: int, height_px: int, *, vertical: bool) -> Image.Image:
    """Red | green | blue bands along the long axis; green is the middle 40% of it."""
    pixels = np.zeros((height_px, width_px, 3), dtype=np.uint8)
    length = height_px if vertical else width_px
    start, stop = int(length * 0.3), int(length * 0.7)
    index = np.arange(length)
    colour = np.where(index < start, 0, np.where(index < stop, 1, 2))
    channel_values = np.eye(3, dtype=np.uint8)[colour] * 255
    if vertical:
        pixels[:] = channel_values[:, None, :]
    else:
        pixels[:] = channel_values[None, :, :]
    return Image.fromarray(pixels)


def test_fit_to_bucket_centre_crops_a_wide_image():
    # 300x100 covers 64x64 at 192x64; the central 64 columns are the source's columns 100..200,
    # inside the green band (90..210), so the whole output is green, with no red or blue edge.
    fitted = fit_to_bucket(_three_bands(300, 100, vertical=False), Bucket("64x64", "1:1", 64, 64))
    assert fitted.size == (64, 64)
    pixels = np.asarray(fitted).astype(int)
    assert (pixels[:, 2:-2, 1] > 230).all()
    assert (pixels[:, 2:-2, 0] < 25).all() and (pixels[:, 2:-2, 2] < 25).all()


def test_fit_to_bucket_centre_crops_a_tall_image():
    # 60x180 covers 32x64 at 32x96; output rows 0..63 are the source's rows 30..150, so the
    # green band (54..126) fills output rows 13..51, with red above and blue below.
    fitted = fit_to_bucket(_three_bands(60, 180, vertical=True), Bucket("32x64", "1:2", 32, 64))
    assert fitted.size == (32, 64)
    pixels = np.asarray(fitted).astype(int)
    assert pixels[2, 16, 0] > 200 and pixels[61, 16, 2] > 200
    assert pixels[32, 16, 1] > 200 and pixels[32, 16, 0] < 30


@pytest.mark.parametrize("source_size", [(10, 7), (333, 101), (64, 64), (1, 5), (2000, 31)])
def test_fit_to_bucket_always_returns_the_exact_bucket_size(source_size):
    image = Image.new("RGB", source_size, (10, 20, 30))
    for bucket in build_buckets(BucketConfig(max_side_px=64, multiple_px=8)):
        fitted = fit_to_bucket(image, bucket)
        assert fitted.size == (bucket.width_px, bucket.height_px)
        assert fitted.mode == "RGB"


def test_fitted_image_packs_and_unpacks_losslessly():
    bucket = Bucket("48x32", "3:2", 48, 32)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), mode="RGB")
    fitted = fit_to_bucket(noise, bucket)
    packed = pack_fitted_image(fitted, bucket)
    assert len(packed) == 48 * 32 * 3
    back = unpack_fitted_image(packed, bucket)
    assert (back.mode, back.size) == ("RGB", (48, 32))
    assert np.array_equal(np.asarray(back), np.asarray(fitted))


def test_packing_refuses_images_that_are_not_the_buckets_rgb():
    bucket = Bucket("48x32", "3:2", 48, 32)
    with pytest.raises(ValueError, match="48x32"):
        pack_fitted_image(Image.new("RGB", (32, 48)), bucket)
    with pytest.raises(ValueError, match="RGB"):
        pack_fitted_image(Image.new("L", (48, 32)), bucket)
    with pytest.raises(ValueError, match="4608 RGB bytes"):
        unpack_fitted_image(b"\x00" * 100, bucket)
