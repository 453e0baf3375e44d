"""Filters: decoding to RGB (content checked, not just mode), bombs, truncation, the order of
checks in filter_sample, perceptual hashes and duplicate detection against brute force."""

import hashlib
import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from components.data.buckets import BucketConfig, fit_to_bucket
from components.data.filters import (
    FILTER_REASONS,
    FilterConfig,
    FilteredSample,
    Rejection,
    SampleRejected,
    filter_sample,
    find_duplicates,
    hamming_distance,
    normalise_image,
    perceptual_hash,
)

pytestmark = pytest.mark.unit

MAX_PIXELS = 1_000_000
TINY_FILTERS = FilterConfig(min_side_px=32)
TINY_BUCKETS = BucketConfig(max_side_px=64, multiple_px=8)
GOOD_CAPTION = "a red square on grey"


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _smooth_image(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """Random 8x8 colours upsampled: image-like low-frequency structure, unique per seed."""
    colours = (np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(colours).resize(size, Image.Resampling.BICUBIC)


def _normalise(data: bytes) -> np.ndarray:
    image = normalise_image(data, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def _png_header_only(width_px: int, height_px: int) -> bytes:
    """A PNG whose IHDR declares the size but whose pixel data is an empty stream."""
    ihdr = struct.pack(">IIBBBBB", width_px, height_px, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


# --- normalise_image -------------------------------------------------------------------------


def test_exif_orientation_6_turns_landscape_into_portrait_with_marker_top_right():
    # Orientation 6 = stored image must be rotated 90 degrees clockwise for display: the stored
    # top-left corner ends up top-right.
    stored = np.full((24, 40, 3), 128, dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    pixels = _normalise(data)
    assert pixels.shape == (40, 24, 3)
    assert pixels[3, 20, 0] > 200 and pixels[3, 20, 1] < 60
    assert abs(pixels[3, 3, 0] - 128) < 20 and abs(pixels[36, 3, 0] - 128) < 20


def test_cmyk_becomes_the_matching_rgb_colour():
    cyan = _encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    red = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF")
    assert np.abs(_normalise(cyan)[8, 8] - (0, 255, 255)).max() <= 8
    assert np.abs(_normalise(red)[8, 8] - (255, 0, 0)).max() <= 8


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_sixteen_bit_gradient_is_scaled_not_clipped(dtype):
    gradient = np.tile(np.linspace(0, 65535, 256).round(), (4, 1)).astype(dtype)
    data = _encode(Image.fromarray(gradient), "PNG" if dtype == np.uint16 else "TIFF")
    pixels = _normalise(data)
    assert pixels.shape == (4, 256, 3)
    row = pixels[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 200
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_palette_transparency_becomes_white():
    indices = np.zeros((8, 16), dtype=np.uint8)
    indices[:, 8:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pixels = _normalise(_encode(image, "PNG", transparency=0))
    assert pixels.shape == (8, 16, 3)
    assert (pixels[:, :8] == 255).all()
    assert (pixels[:, 8:] == (255, 0, 0)).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white_not_black(mode):
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[:, 8:] = (0, 0, 0, 255)
    rgba[:, 4:8] = (0, 0, 0, 128)
    pixels = _normalise(_encode(Image.fromarray(rgba, mode="RGBA").convert(mode), "PNG"))
    assert (pixels[:, :4] == 255).all()
    assert (np.abs(pixels[:, 4:8] - 127) <= 2).all()
    assert (pixels[:, 8:] == 0).all()


def test_animated_gif_keeps_the_first_frame():
    frames = [Image.new("RGB", (20, 10), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels = _normalise(data)
    assert pixels.shape == (10, 20, 3)
    assert (pixels == (255, 0, 0)).all()


def test_grayscale_becomes_equal_rgb_channels():
    pixels = _normalise(_encode(Image.new("L", (8, 4), 77), "PNG"))
    assert (pixels == 77).all()


@pytest.mark.parametrize("cut", ["half", "missing_end_marker"])
def test_truncated_jpeg_is_a_decode_error(cut):
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    truncated = data[: len(data) // 2] if cut == "half" else data[:-2]
    with pytest.raises(SampleRejected) as caught:
        normalise_image(truncated, max_pixels=MAX_PIXELS)
    assert caught.value.reason == "decode_error"


@pytest.mark.parametrize("data", [b"", b"<html>not found</html>", b"\x89PNG\r\n\x1a\n", None])
def test_non_image_input_is_a_decode_error(data):
    with pytest.raises(SampleRejected) as caught:
        normalise_image(data, max_pixels=MAX_PIXELS)
    assert caught.value.reason == "decode_error"


@pytest.mark.parametrize(
    ("size", "max_pixels"),
    [
        ((30_000, 30_000), 40_000_000),  # Pillow's own DecompressionBombError at open
        ((8_000, 6_000), 40_000_000),  # our header check: 48M > 40M
        ((10_000, 9_000), 200_000_000),  # Pillow's DecompressionBombWarning (> 89.5M)
    ],
)
def test_bomb_header_is_rejected_without_decoding(size, max_pixels):
    data = _png_header_only(*size)
    tracemalloc.start()
    try:
        with pytest.raises(SampleRejected) as caught:
            normalise_image(data, max_pixels=max_pixels)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "decompression_bomb"
    assert peak_bytes < 5_000_000


# --- filter_sample ---------------------------------------------------------------------------


def _filter(data: bytes, caption: str | None = GOOD_CAPTION, **overrides) -> object:
    scores = overrides.pop("scores", {})
    config = overrides.pop("config", TINY_FILTERS)
    buckets = overrides.pop("buckets", TINY_BUCKETS)
    return filter_sample(data, caption, scores=scores, config=config, buckets=buckets)


def test_kept_sample_is_bucketed_and_carries_hashes():
    data = _encode(_smooth_image(3, (96, 54)), "JPEG", quality=90)
    result = _filter(data)
    assert isinstance(result, FilteredSample)
    assert result.bucket.bucket_id == "64x40"
    assert result.fitted.size == (64, 40) and result.fitted.mode == "RGB"
    normalised = normalise_image(data, max_pixels=MAX_PIXELS)
    expected = fit_to_bucket(normalised, result.bucket)
    assert result.fitted.tobytes() == expected.tobytes(), "fitted once, exactly as fit_to_bucket"
    assert (result.width_px, result.height_px) == (96, 54)
    assert result.image_sha256 == hashlib.sha256(data).hexdigest()
    assert 0 <= result.phash < 2**64
    assert result.phash == perceptual_hash(normalise_image(data, max_pixels=MAX_PIXELS))


def test_kept_sample_reports_the_oriented_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_smooth_image(4, (96, 54)), "JPEG", exif=exif.tobytes())
    result = _filter(data)
    assert isinstance(result, FilteredSample)
    assert (result.width_px, result.height_px) == (54, 96)
    assert result.bucket.bucket_id == "32x64"


GOOD_JPEG = _encode(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")


@pytest.mark.parametrize(
    ("data", "caption", "scores", "config", "reason"),
    [
        (b"garbage", None, {}, TINY_FILTERS, "missing_caption"),
        (b"garbage", "  ab  ", {}, TINY_FILTERS, "missing_caption"),
        (b"garbage", GOOD_CAPTION, {}, FilterConfig(max_nsfw_score=0.5), "missing_score"),
        (b"garbage", GOOD_CAPTION, {}, TINY_FILTERS, "decode_error"),
        (GOOD_JPEG, GOOD_CAPTION, {}, FilterConfig(min_side_px=65), "too_small"),
        (
            GOOD_JPEG,
            GOOD_CAPTION,
            {"aesthetic_score": 4.0},
            FilterConfig(min_side_px=32, min_aesthetic_score=5.0),
            "low_aesthetic",
        ),
        (
            GOOD_JPEG,
            GOOD_CAPTION,
            {"watermark_score": 0.9},
            FilterConfig(min_side_px=32, max_watermark_score=0.5),
            "watermark",
        ),
        (
            GOOD_JPEG,
            GOOD_CAPTION,
            {"nsfw_score": 0.7},
            FilterConfig(min_side_px=32, max_nsfw_score=0.5),
            "nsfw",
        ),
        (
            GOOD_JPEG,
            GOOD_CAPTION,
            {"nsfw_score": float("nan")},
            FilterConfig(min_side_px=32, max_nsfw_score=0.5),
            "missing_score",
        ),
    ],
)
def test_rejections_come_in_the_documented_order(data, caption, scores, config, reason):
    result = _filter(data, caption, scores=scores, config=config)
    assert isinstance(result, Rejection)
    assert result.reason == reason and result.reason in FILTER_REASONS
    assert result.detail


def test_scores_pass_at_threshold_and_unthresholded_scores_may_be_missing():
    config = FilterConfig(min_side_px=32, min_aesthetic_score=5.0, max_nsfw_score=0.5)
    result = _filter(GOOD_JPEG, scores={"aesthetic_score": 5.0, "nsfw_score": 0.5}, config=config)
    assert isinstance(result, FilteredSample)
    assert isinstance(_filter(GOOD_JPEG, scores={"watermark_score": None}), FilteredSample)


def test_extreme_aspect_is_rejected():
    data = _encode(Image.new("RGB", (400, 60), (0, 0, 255)), "PNG")
    result = _filter(data)
    assert isinstance(result, Rejection) and result.reason == "aspect_out_of_range"


def test_aspect_between_buckets_with_too_much_crop_is_rejected():
    # Buckets at 256: 128x256 (1:2) and 256x256 (1:1). 100x138 is nearest 1:1 at log distance
    # 0.322 (within 0.35) but a square crop discards 1 - 100/138 = 27.5% > 25%.
    data = _encode(Image.new("RGB", (100, 138), (0, 0, 255)), "PNG")
    result = _filter(data, buckets=BucketConfig(max_side_px=256))
    assert isinstance(result, Rejection) and result.reason == "crop_too_large"


def test_filter_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="min_side_px"):
        FilterConfig(min_side_px=0)
    with pytest.raises(ValueError, match="phash_max_distance"):
        FilterConfig(phash_max_distance=40)
    with pytest.raises(ValueError, match="max_nsfw_score"):
        FilterConfig(max_nsfw_score=float("nan"))


# --- perceptual hash and duplicates ------------------------------------------------------------


def test_phash_survives_reencoding_and_resizing_but_separates_different_images():
    original = _smooth_image(1)
    copy = _encode(original.resize((240, 240), Image.Resampling.BILINEAR), "JPEG", quality=30)
    copy_hash = perceptual_hash(normalise_image(copy, max_pixels=MAX_PIXELS))
    assert hamming_distance(perceptual_hash(original), copy_hash) <= 4
    for seed in range(2, 6):
        other_hash = perceptual_hash(_smooth_image(seed))
        assert hamming_distance(perceptual_hash(original), other_hash) > 16


def test_exact_and_near_duplicates_point_at_the_first_kept_row():
    original = _smooth_image(1)
    near = _encode(original.resize((230, 230)), "JPEG", quality=40)
    hashes = {
        "original": perceptual_hash(original),
        "near": perceptual_hash(normalise_image(near, max_pixels=MAX_PIXELS)),
        "other": perceptual_hash(_smooth_image(7)),
    }
    entries = [
        ("a", "sha-original", hashes["original"]),
        ("b", "sha-other", hashes["other"]),
        ("c", "sha-original", hashes["original"]),
        ("d", "sha-near", hashes["near"]),
    ]
    assert find_duplicates(entries, max_distance=4) == {
        "c": ("exact_duplicate", "a"),
        "d": ("near_duplicate", "a"),
    }
    # Reversed, d is kept first; c and a (same bytes as the dropped c) both point at d.
    assert find_duplicates(entries[::-1], max_distance=4) == {
        "c": ("near_duplicate", "d"),
        "a": ("near_duplicate", "d"),
    }
    assert find_duplicates(entries, max_distance=0) == {"c": ("exact_duplicate", "a")}


def test_rows_are_compared_with_kept_rows_only():
    # b is 3 bits from a (dropped); c is 3 bits from b but 6 from a, so c is kept.
    entries = [("a", "1", 0b000000), ("b", "2", 0b000111), ("c", "3", 0b111111)]
    assert find_duplicates(entries, max_distance=4) == {"b": ("near_duplicate", "a")}


def test_signed_int64_phash_is_read_as_its_64_bits():
    unsigned = (1 << 63) | 5
    signed = unsigned - (1 << 64)
    entries = [("a", "1", unsigned), ("b", "2", signed)]
    assert find_duplicates(entries, max_distance=2) == {"b": ("near_duplicate", "a")}


def test_repeated_keys_are_a_caller_error():
    with pytest.raises(ValueError, match="key"):
        find_duplicates([("a", "1", 1), ("a", "2", 2)], max_distance=4)


def _brute_force(entries: list[tuple[str, str, int]], max_distance: int) -> dict:
    kept: list[tuple[str, str, int]] = []
    duplicates = {}
    for key, sha, phash in entries:
        exact = next((kept_key for kept_key, kept_sha, _ in kept if kept_sha == sha), None)
        near = next(
            (
                kept_key
                for kept_key, _, kept_hash in kept
                if hamming_distance(kept_hash, phash) <= max_distance
            ),
            None,
        )
        if exact is not None:
            duplicates[key] = ("exact_duplicate", exact)
        elif near is not None and max_distance > 0:
            duplicates[key] = ("near_duplicate", near)
        else:
            kept.append((key, sha, phash))
    return duplicates


@pytest.mark.parametrize("max_distance", [1, 4, 9])
def test_band_index_matches_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    bases = [int(value) for value in rng.integers(0, 2**63, size=400, dtype=np.int64)]
    entries = []
    for position in range(2000):
        phash = bases[int(rng.integers(len(bases)))] << 1 | int(rng.integers(2))
        for bit in rng.choice(64, size=int(rng.integers(0, 2 * max_distance + 2)), replace=False):
            phash ^= 1 << int(bit)
        sha = f"sha-{int(rng.integers(1900))}"
        entries.append((f"key-{position:04d}", sha, phash))
    expected = _brute_force(entries, max_distance)
    near_count = sum(reason == "near_duplicate" for reason, _ in expected.values())
    assert near_count > 100
    assert find_duplicates(entries, max_distance=max_distance) == expected
