"""Sample filters: caption and score thresholds, safe decoding to RGB, size/aspect/crop checks
and duplicate detection (exact by sha256, near by 64-bit DCT perceptual hash).

Sits after download in the data pipeline (download -> filter -> bucket -> encode). Per sample,
`filter_sample` takes the downloaded bytes, the caption and optional source scores and returns
either a `FilteredSample` (image fitted to its aspect bucket, bucket, oriented original size,
image_sha256, phash) or a `Rejection` whose reason is one of FILTER_REASONS. This is the only
place an image is decoded and fitted: the encoder takes the fitted image as it is. Across samples,
`find_duplicates` takes (key, image_sha256, phash) rows in priority order and names the rows
to drop. Nothing here raises on bad data; only bad configuration raises ValueError.
"""

import array
import hashlib
import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.fft
from PIL import Image, ImageFile, ImageOps

from components.data.buckets import (
    Bucket,
    BucketConfig,
    aspect_distance,
    build_buckets,
    crop_fraction,
    fit_to_bucket,
    nearest_bucket,
)

FILTER_REASONS = (
    "decode_error",
    "decompression_bomb",
    "too_small",
    "aspect_out_of_range",
    "crop_too_large",
    "missing_caption",
    "missing_score",
    "low_aesthetic",
    "watermark",
    "nsfw",
    "exact_duplicate",
    "near_duplicate",
)
"""Every reason a sample can be dropped for; counters should be keyed by these."""

AESTHETIC_SCORE = "aesthetic_score"
WATERMARK_SCORE = "watermark_score"
NSFW_SCORE = "nsfw_score"

_HASH_BITS = 64
_HASH_MASK = (1 << _HASH_BITS) - 1
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


@dataclass(frozen=True, kw_only=True, slots=True)
class FilterConfig:
    """Thresholds a sample must pass before it is bucketed and encoded."""

    min_side_px: int = 512
    """Shorter side of the decoded, orientation-corrected image must be at least this."""
    max_pixels: int = 40_000_000
    """Width x height read from the header above this is a decompression bomb (never decoded)."""
    min_caption_chars: int = 3
    """Captions shorter than this after stripping whitespace count as missing."""
    phash_max_distance: int = 4
    """Hamming distance between 64-bit pHashes counted as a near duplicate; 0 disables."""
    min_aesthetic_score: float | None = None
    """Reject below this aesthetic_score; None disables (and a missing score is then fine)."""
    max_watermark_score: float | None = None
    """Reject above this watermark_score; None disables."""
    max_nsfw_score: float | None = None
    """Reject above this nsfw_score; None disables."""

    def __post_init__(self) -> None:
        if self.min_side_px <= 0:
            raise ValueError(f"min_side_px must be > 0, got {self.min_side_px}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")
        if self.min_caption_chars < 0:
            raise ValueError(f"min_caption_chars must be >= 0, got {self.min_caption_chars}")
        if not 0 <= self.phash_max_distance <= 32:
            raise ValueError(
                f"phash_max_distance must be in [0, 32], got {self.phash_max_distance}"
            )
        for name in ("min_aesthetic_score", "max_watermark_score", "max_nsfw_score"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite or None, got {value}")


class SampleRejected(Exception):
    """Raised by normalise_image; reason is one of FILTER_REASONS, detail says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Rejection:
    """A dropped sample: reason is one of FILTER_REASONS."""

    reason: str
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class FilteredSample:
    """A kept sample, with its image already fitted to its bucket (what the encoder takes)."""

    fitted: Image.Image
    """The decoded RGB image (orientation applied), cover-resized and centre-cropped to exactly
    bucket.width_px x bucket.height_px by `fit_to_bucket`."""
    bucket: Bucket
    width_px: int
    """Width of the decoded source image after EXIF orientation (not the bucket's width)."""
    height_px: int
    """Height of the decoded source image after EXIF orientation (not the bucket's height)."""
    image_sha256: str
    """sha256 hex digest of the downloaded bytes, exactly as received."""
    phash: int
    """64-bit DCT perceptual hash of the normalised (unbucketed) image, in [0, 2**64)."""


def _open_header(data: bytes, *, max_pixels: int) -> Image.Image:
    """Image.open reads only the header; the size check happens before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleRejected("decompression_bomb", str(exc)) from None
    except Exception as exc:
        raise SampleRejected("decode_error", f"{type(exc).__name__}: {exc}"[:300]) from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleRejected(
            "decompression_bomb", f"header says {width}x{height} > {max_pixels} pixels"
        )
    return image


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Scale a high-bit-depth single-band image (I;16*, I, F) to L over its nominal range."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float32))
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    elif image.mode == "F" and peak <= 1.0:
        full_scale = 1.0
    elif peak <= 255.0:
        full_scale = 255.0
    elif peak <= 65535.0:
        full_scale = 65535.0
    else:
        full_scale = peak
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB 8-bit; transparency is composited on white rather than dropped (which gives black)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_eight_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def normalise_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode bytes to an RGB 8-bit image, EXIF orientation applied, first frame only.

    CMYK is converted with Pillow's plain formula (embedded ICC profiles are ignored); alpha and
    palette transparency are composited on white; 16-bit data is scaled, not clipped.
    Raises SampleRejected("decompression_bomb") when the header (or Pillow's own guard) reports
    too many pixels and SampleRejected("decode_error") for anything that does not decode fully,
    truncated files included.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False: it hides truncation"
        )
    if not isinstance(data, bytes | bytearray | memoryview) or not data:
        raise SampleRejected("decode_error", f"expected non-empty bytes, got {type(data).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open_header(bytes(data), max_pixels=max_pixels)
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return _to_rgb(oriented)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SampleRejected("decompression_bomb", str(exc)) from None
        except Exception as exc:
            raise SampleRejected("decode_error", f"{type(exc).__name__}: {exc}"[:300]) from None


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT pHash in [0, 2**64): equal or near for re-encoded or resized copies.

    Grayscale, Lanczos to 32x32, orthonormal 2-D DCT-II, keep the 8x8 lowest frequencies
    (row-major, DC first = bit 63). Each bit is coefficient > median of the 63 AC terms: DC is
    left out of the median because it only carries mean brightness, so its bit is 1 for any
    non-black image and never separates two images.
    """
    gray = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    coefficients = scipy.fft.dctn(np.asarray(gray, dtype=np.float64), type=2, norm="ortho")
    low = coefficients[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def needs_caption(caption: str | None, config: FilterConfig) -> bool:
    """A caption the caption check would reject: missing, or under min_caption_chars."""
    return not isinstance(caption, str) or len(caption.strip()) < max(1, config.min_caption_chars)


def _check_caption(caption: str | None, config: FilterConfig) -> Rejection | None:
    if not isinstance(caption, str) or len(caption.strip()) < config.min_caption_chars:
        return Rejection("missing_caption", f"caption {caption!r:.60} < {config.min_caption_chars}")
    return None


def _score(scores: Mapping[str, float | None], name: str) -> float | None:
    """The named score as a finite float, or None if absent, null, NaN or not a number."""
    try:
        value = float(scores[name])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _check_scores(scores: Mapping[str, float | None], config: FilterConfig) -> Rejection | None:
    """A set threshold with no score to test is a rejection: an unscored row never passes."""
    checks = (
        (AESTHETIC_SCORE, config.min_aesthetic_score, "low_aesthetic", -1.0),
        (WATERMARK_SCORE, config.max_watermark_score, "watermark", 1.0),
        (NSFW_SCORE, config.max_nsfw_score, "nsfw", 1.0),
    )
    for name, threshold, reason, sign in checks:
        if threshold is None:
            continue
        value = _score(scores, name)
        if value is None:
            return Rejection("missing_score", f"{name} is missing, threshold {threshold}")
        if sign * value > sign * threshold:
            return Rejection(reason, f"{name} {value:g} vs threshold {threshold:g}")
    return None


def _check_geometry(
    width_px: int, height_px: int, *, config: FilterConfig, buckets: BucketConfig
) -> Bucket | Rejection:
    if min(width_px, height_px) < config.min_side_px:
        return Rejection(
            "too_small", f"{width_px}x{height_px}: shorter side < {config.min_side_px} px"
        )
    bucket = nearest_bucket(width_px, height_px, build_buckets(buckets))
    distance = aspect_distance(width_px, height_px, bucket)
    if distance > buckets.max_log_aspect_distance:
        return Rejection(
            "aspect_out_of_range",
            f"{width_px}x{height_px}: log-aspect distance {distance:.3f} to {bucket.bucket_id}",
        )
    fraction = crop_fraction(width_px, height_px, bucket)
    if fraction > buckets.max_crop_fraction:
        return Rejection(
            "crop_too_large", f"{width_px}x{height_px}: crop {fraction:.3f} to {bucket.bucket_id}"
        )
    return bucket


def filter_sample(
    image_bytes: bytes,
    caption: str | None,
    *,
    scores: Mapping[str, float | None],
    config: FilterConfig,
    buckets: BucketConfig,
) -> FilteredSample | Rejection:
    """Check one sample: caption, scores, decode/bomb, size, aspect, crop, in that order.

    scores holds the optional source columns aesthetic_score, watermark_score, nsfw_score.
    A kept sample carries its image fitted to the nearest bucket, and its sha256 and pHash
    for find_duplicates, which runs across samples afterwards.
    """
    rejection = _check_caption(caption, config) or _check_scores(scores, config)
    if rejection is not None:
        return rejection
    try:
        image = normalise_image(image_bytes, max_pixels=config.max_pixels)
    except SampleRejected as exc:
        return Rejection(exc.reason, exc.detail)
    width_px, height_px = image.size
    bucket = _check_geometry(width_px, height_px, config=config, buckets=buckets)
    if isinstance(bucket, Rejection):
        return bucket
    return FilteredSample(
        fitted=fit_to_bucket(image, bucket),
        bucket=bucket,
        width_px=width_px,
        height_px=height_px,
        image_sha256=hashlib.sha256(image_bytes).hexdigest(),
        phash=perceptual_hash(image),
    )


def hamming_distance(hash_a: int, hash_b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return ((hash_a ^ hash_b) & _HASH_MASK).bit_count()


def _band_layout(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of max_distance + 1 bands covering the 64 bits, widths differing by <= 1."""
    num_bands = max_distance + 1
    base_width, num_wider = divmod(_HASH_BITS, num_bands)
    layout, shift = [], 0
    for band in range(num_bands):
        width = base_width + (1 if band < num_wider else 0)
        layout.append((shift, (1 << width) - 1))
        shift += width
    return layout


class _NearIndex:
    """Kept hashes indexed by band. Two hashes within d bits agree exactly on at least one of
    d + 1 bands (pigeonhole), so only rows sharing a band value need a Hamming check."""

    def __init__(self, max_distance: int, capacity: int) -> None:
        self.max_distance = max_distance
        self.layout = _band_layout(max_distance)
        # array('q') buckets turn into numpy with one memcpy; lists of ints would be converted
        # element by element, which dominated the run time at 10^5 rows.
        self.tables: list[dict[int, array.array]] = [{} for _ in self.layout]
        self.hashes = np.zeros(capacity, dtype=np.uint64)
        self.size = 0

    def first_match(self, phash: int) -> int | None:
        """Lowest kept position within max_distance of phash, or None."""
        buckets = [
            table.get((phash >> shift) & mask)
            for (shift, mask), table in zip(self.layout, self.tables, strict=True)
        ]
        joined = b"".join(bucket.tobytes() for bucket in buckets if bucket is not None)
        if not joined:
            return None
        found = np.frombuffer(joined, dtype=np.int64)
        distances = np.bitwise_count(self.hashes[found] ^ np.uint64(phash))
        hits = found[distances <= self.max_distance]
        return int(hits.min()) if hits.size else None

    def add(self, phash: int) -> int:
        position = self.size
        self.hashes[position] = phash
        for (shift, mask), table in zip(self.layout, self.tables, strict=True):
            band_value = (phash >> shift) & mask
            if band_value not in table:
                table[band_value] = array.array("q")
            table[band_value].append(position)
        self.size += 1
        return position


def find_duplicates(
    entries: list[tuple[str, str, int]], *, max_distance: int
) -> dict[str, tuple[str, str]]:
    """Rows to drop: {key: (reason, kept key)}, reason "exact_duplicate" or "near_duplicate".

    entries are (key, image_sha256, phash) in priority order; the first occurrence is kept and
    later rows are compared with kept rows only, so every dropped row names a kept one and the
    kept rows are pairwise more than max_distance bits apart (max_distance 0 disables near
    duplicates). A phash stored as signed int64 is accepted and read as its 64 bits.
    """
    if not 0 <= max_distance < _HASH_BITS:
        raise ValueError(f"max_distance must be in [0, 63], got {max_distance}")
    near_index = _NearIndex(max_distance, len(entries)) if max_distance > 0 else None
    kept_keys: list[str] = []
    kept_by_sha: dict[str, str] = {}
    seen_keys: set[str] = set()
    duplicates: dict[str, tuple[str, str]] = {}
    for key, image_sha256, phash in entries:
        if key in seen_keys:
            raise ValueError(f"entries repeat key {key!r}; keys must be unique")
        seen_keys.add(key)
        if image_sha256 in kept_by_sha:
            duplicates[key] = ("exact_duplicate", kept_by_sha[image_sha256])
            continue
        phash &= _HASH_MASK
        if near_index is not None:
            match = near_index.first_match(phash)
            if match is not None:
                duplicates[key] = ("near_duplicate", kept_keys[match])
                continue
            near_index.add(phash)
        kept_by_sha[image_sha256] = key
        kept_keys.append(key)
    return duplicates
