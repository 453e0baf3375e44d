"""Aspect-ratio buckets: which training size an image goes to, and the resize + crop to get there.

Sits after the filters in the data pipeline (download -> filter -> bucket -> encode). Input: an
RGB image (or just its width and height); output: the nearest `Bucket` by log aspect ratio and
the image covered-resized and centre-cropped to exactly that bucket's size. The report's ratios
(16:9, 2:1, 2.35:1, 1:1, 1:2, longest side at most 1024) are the defaults. A fitted image travels
from the filter step to the encoder as its raw RGB bytes (`pack_fitted_image`,
`unpack_fitted_image`), so it is decoded and fitted once.

Geometry used throughout: for an image of aspect a and a bucket of aspect b, d = |ln a - ln b|,
and a cover resize + centre crop keeps the fraction exp(-d) of the image area, so the
discarded fraction is 1 - exp(-d) (up to integer rounding of the resized size).
Upscaling is allowed: a source smaller than its bucket is enlarged; `FilterConfig.min_side_px`
is what keeps tiny sources out.
"""

import functools
import math
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketConfig:
    """Bucket sizes and the aspect/crop tolerances an image must meet to enter one."""

    aspect_ratios: tuple[str, ...] = ("16:9", "2:1", "2.35:1", "1:1", "1:2")
    """Bucket aspect ratios written W:H; the order breaks ties between ratios of equal size."""
    max_side_px: int = 1024
    """Longest side of every bucket is at most this (the tiny preset uses e.g. 64)."""
    multiple_px: int = 16
    """Both bucket sides are multiples of this (16 = VAE /8 times FLUX 2x2 patch packing)."""
    # 0.35 is just over half the widest gap between default buckets (1:2 to 1:1 is ln 2 =
    # 0.693): no image lying between two buckets is out of range (the crop check judges it);
    # only images wider than about 3.4:1 or taller than about 1:2.8 are.
    max_log_aspect_distance: float = 0.35
    """Reject as aspect_out_of_range if |ln aspect - ln bucket aspect| to the nearest exceeds."""
    max_crop_fraction: float = 0.25
    """Reject as crop_too_large if cover-resize + centre crop discards more of the area."""

    def __post_init__(self) -> None:
        if not self.aspect_ratios:
            raise ValueError("aspect_ratios must not be empty")
        if len(set(self.aspect_ratios)) != len(self.aspect_ratios):
            raise ValueError(f"aspect_ratios has repeated entries: {self.aspect_ratios}")
        for ratio in self.aspect_ratios:
            parse_aspect_ratio(ratio)
        if self.multiple_px <= 0:
            raise ValueError(f"multiple_px must be > 0, got {self.multiple_px}")
        if self.max_side_px < self.multiple_px:
            raise ValueError(
                f"max_side_px must be >= multiple_px ({self.multiple_px}), got {self.max_side_px}"
            )
        if not self.max_log_aspect_distance > 0:
            raise ValueError(
                f"max_log_aspect_distance must be > 0, got {self.max_log_aspect_distance}"
            )
        if not 0 <= self.max_crop_fraction < 1:
            raise ValueError(f"max_crop_fraction must be in [0, 1), got {self.max_crop_fraction}")
        self._check_sizes_distinct()

    def _check_sizes_distinct(self) -> None:
        # Two ratios on one size would silently serve fewer buckets than the config lists.
        first_ratio_by_size: dict[tuple[int, int], str] = {}
        for ratio, size in _ratio_sizes(self).items():
            if size in first_ratio_by_size:
                raise ValueError(
                    f"aspect_ratios {first_ratio_by_size[size]} and {ratio} both round to "
                    f"{size[0]}x{size[1]} at max_side_px={self.max_side_px}, "
                    f"multiple_px={self.multiple_px}: raise max_side_px or drop a ratio"
                )
            first_ratio_by_size[size] = ratio


@dataclass(frozen=True, slots=True)
class Bucket:
    """One training size; bucket_id is "<width>x<height>", aspect_name the W:H ratio it serves."""

    bucket_id: str
    aspect_name: str
    width_px: int
    height_px: int

    @property
    def aspect(self) -> float:
        """Realised width / height (2.35:1 is 1024x432 = 2.370 at the defaults)."""
        return self.width_px / self.height_px


def parse_aspect_ratio(ratio: str) -> float:
    """Return W / H for a "W:H" string; ValueError naming aspect_ratios if malformed."""
    parts = ratio.split(":")
    try:
        width, height = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"aspect_ratios entry {ratio!r} is not 'W:H'") from None
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"aspect_ratios entry {ratio!r} must have positive finite W and H")
    return width / height


def _bucket_size(aspect: float, *, max_side_px: int, multiple_px: int) -> tuple[int, int]:
    """(long, short) side: long = largest multiple <= max side, short = multiple nearest in log."""
    long_px = (max_side_px // multiple_px) * multiple_px
    exact_short = long_px / max(aspect, 1 / aspect)
    below = max(multiple_px, math.floor(exact_short / multiple_px) * multiple_px)
    above = min(long_px, below + multiple_px)
    # Nearest in log aspect, not in pixels; a tie keeps the larger side (more pixels).
    if abs(math.log(exact_short / below)) < abs(math.log(above / exact_short)):
        return long_px, below
    return long_px, above


def _ratio_sizes(config: BucketConfig) -> dict[str, tuple[int, int]]:
    """(width, height) per ratio string, before the distinctness check."""
    sizes = {}
    for ratio in config.aspect_ratios:
        aspect = parse_aspect_ratio(ratio)
        long_px, short_px = _bucket_size(
            aspect, max_side_px=config.max_side_px, multiple_px=config.multiple_px
        )
        sizes[ratio] = (long_px, short_px) if aspect >= 1 else (short_px, long_px)
    return sizes


@functools.lru_cache(maxsize=16)
def build_buckets(config: BucketConfig) -> tuple[Bucket, ...]:
    """One bucket per aspect ratio, sorted by realised aspect (tallest first).

    Longest side = the largest multiple of multiple_px <= max_side_px; the other side is the
    multiple of multiple_px whose aspect is nearest the ratio in log terms, so 2.35:1 at 1024
    becomes 1024x432 (2.370; 448 would give 2.286). BucketConfig has already refused ratios
    that round to the same size, so bucket ids are unique.
    """
    buckets = [
        Bucket(f"{width}x{height}", ratio, width, height)
        for ratio, (width, height) in _ratio_sizes(config).items()
    ]
    return tuple(sorted(buckets, key=lambda bucket: (bucket.aspect, bucket.bucket_id)))


def aspect_distance(width_px: int, height_px: int, bucket: Bucket) -> float:
    """|ln(width / height) - ln(bucket aspect)|; 0 means the same shape."""
    return abs(math.log(width_px / height_px) - math.log(bucket.aspect))


def nearest_bucket(width_px: int, height_px: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket nearest in log aspect; ties go to the larger area, then the smaller bucket_id."""
    if width_px <= 0 or height_px <= 0:
        raise ValueError(f"image size must be positive, got {width_px}x{height_px}")
    if not buckets:
        raise ValueError("buckets must not be empty")

    def rank(bucket: Bucket) -> tuple[float, int, str]:
        # Rounded so that float noise cannot decide a geometric tie.
        distance = round(aspect_distance(width_px, height_px, bucket), 9)
        return distance, -bucket.width_px * bucket.height_px, bucket.bucket_id

    return min(buckets, key=rank)


def _cover_size(width_px: int, height_px: int, bucket: Bucket) -> tuple[int, int]:
    """Smallest aspect-keeping size that covers the bucket (each side >= the bucket's)."""
    scale = max(bucket.width_px / width_px, bucket.height_px / height_px)
    return (
        max(bucket.width_px, round(width_px * scale)),
        max(bucket.height_px, round(height_px * scale)),
    )


def crop_fraction(width_px: int, height_px: int, bucket: Bucket) -> float:
    """Fraction of the image area that fit_to_bucket discards (0 when the shapes match)."""
    cover_width, cover_height = _cover_size(width_px, height_px, bucket)
    return 1.0 - (bucket.width_px * bucket.height_px) / (cover_width * cover_height)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize (Lanczos) so the image covers the bucket, keeping aspect, then centre-crop.

    The result is always exactly bucket.width_px x bucket.height_px, in the input's mode.
    """
    cover_width, cover_height = _cover_size(image.width, image.height, bucket)
    if (cover_width, cover_height) != image.size:
        # reducing_gap: a box pre-reduction makes large downscales fast at no visible cost.
        image = image.resize(
            (cover_width, cover_height), Image.Resampling.LANCZOS, reducing_gap=3.0
        )
    left = (cover_width - bucket.width_px) // 2
    top = (cover_height - bucket.height_px) // 2
    return image.crop((left, top, left + bucket.width_px, top + bucket.height_px))


def pack_fitted_image(image: Image.Image, bucket: Bucket) -> bytes:
    """The fitted image's pixels as raw RGB bytes: row-major, 3 uint8 per pixel, no header.

    Lossless, so `unpack_fitted_image` gives back exactly these pixels. ValueError if the image
    is not RGB at exactly the bucket's size (the shape is the bucket's; it is not stored).
    """
    if image.mode != "RGB" or image.size != (bucket.width_px, bucket.height_px):
        raise ValueError(
            f"expected an RGB {bucket.bucket_id} image, got {image.mode} "
            f"{image.width}x{image.height}"
        )
    return image.tobytes()


def unpack_fitted_image(data: bytes | memoryview, bucket: Bucket) -> Image.Image:
    """Inverse of `pack_fitted_image`: the RGB image of bucket size held in `data` (copied, so
    a memoryview over someone else's buffer may be released afterwards)."""
    expected = bucket.width_px * bucket.height_px * 3
    size = memoryview(data).nbytes
    if size != expected:
        raise ValueError(f"{bucket.bucket_id} image needs {expected} RGB bytes, got {size}")
    return Image.frombytes("RGB", (bucket.width_px, bucket.height_px), data)
