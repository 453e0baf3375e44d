"""Synthetic captioned images for local runs, the demo and tests.

`write_synthetic_corpus` draws coloured shapes on coloured gradient backgrounds, deterministically
from a seed, covering the five aspect buckets (16:9, 2:1, 2.35:1, 1:1, 1:2) plus images the filters
must reject (too small, extreme aspect ratio); it returns one `CorpusItem` per file.
`render_scene` and `encode_image` draw and encode one such picture (the tests' bad-input corpus
uses them). `write_url_list` writes url rows as Parquet or JSONL (columns url, caption, optional
scores). `write_folder_corpus` writes the same kind of images as a local folder source with every
caption form (sidecars, an ImageFolder metadata file, none).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SCORE_COLUMNS: tuple[str, ...] = ("aesthetic_score", "watermark_score", "nsfw_score")
KEPT = "kept"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 60),
    "blue": (40, 70, 200),
    "yellow": (240, 205, 40),
    "orange": (240, 135, 25),
    "purple": (125, 50, 165),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.27),
    "top right": (0.75, 0.27),
    "bottom left": (0.25, 0.73),
    "bottom right": (0.75, 0.73),
    "center": (0.5, 0.5),
}
# (label, width / height, expected reason); 12 entries so any 12 consecutive items hold
# every aspect bucket twice plus one too-small and one extreme-aspect image.
_LAYOUTS: tuple[tuple[str, float, str], ...] = (
    ("16:9", 16 / 9, KEPT),
    ("2:1", 2.0, KEPT),
    ("2.35:1", 2.35, KEPT),
    ("1:1", 1.0, KEPT),
    ("1:2", 0.5, KEPT),
    ("too_small", 1.0, "too_small"),
    ("1:1", 1.0, KEPT),
    ("16:9", 16 / 9, KEPT),
    ("1:2", 0.5, KEPT),
    ("2.35:1", 2.35, KEPT),
    ("2:1", 2.0, KEPT),
    ("extreme", 5.0, "aspect_out_of_range"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class CorpusItem:
    """One synthetic image file and what the pipeline should make of it."""

    relpath: str
    """Path of the file relative to the corpus folder (POSIX separators)."""
    caption: str | None
    """Caption saying colour, shape, position and background; None when missing on purpose."""
    width_px: int
    """Stored width of the image in pixels."""
    height_px: int
    """Stored height of the image in pixels."""
    aspect_label: str = ""
    """Aspect layout the image was drawn for ("16:9", "1:2", "too_small", ...)."""
    expected_reason: str = KEPT
    """"kept" or the filter reason the pipeline should count this image under."""
    scores: dict[str, float] = field(default_factory=dict)
    """Optional quality scores (aesthetic_score, watermark_score, nsfw_score)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Scene:
    """What one picture shows: a SHAPES entry in a COLOURS colour at a POSITIONS place."""

    shape: str
    shape_colour: str
    background_colour: str
    position: str

    @property
    def caption(self) -> str:
        """The ASCII caption that describes the picture."""
        return (
            f"{_article(self.shape_colour)} {self.shape_colour} {self.shape} in the"
            f" {self.position} on {_article(self.background_colour)} {self.background_colour}"
            " background"
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def write_synthetic_corpus(
    out_dir: Path, *, count: int, seed: int, max_side_px: int
) -> list[CorpusItem]:
    """Write `count` images under out_dir; same seed and arguments give the same bytes."""
    if count < 0:
        raise ValueError("count: must be >= 0")
    if max_side_px < 16:
        raise ValueError("max_side_px: must be >= 16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_write_synthetic_item(out_dir, index, seed, max_side_px) for index in range(count)]


def _write_synthetic_item(out_dir: Path, index: int, seed: int, max_side_px: int) -> CorpusItem:
    rng = random.Random(seed * 1_000_003 + index)
    label, aspect, expected = _LAYOUTS[index % len(_LAYOUTS)]
    width, height = _layout_size(label, aspect, max_side_px=max_side_px, rng=rng)
    scene = _random_scene(rng)
    image = render_scene(scene, width=width, height=height, rng=rng)
    use_png = index % 4 == 3
    relpath = f"img_{index:05d}.{'png' if use_png else 'jpg'}"
    data = encode_image(image, "PNG") if use_png else encode_image(image, "JPEG", quality=90)
    _write_bytes_atomic(out_dir / relpath, data)
    # Scores stay inside ranges any sane threshold accepts, so only size/aspect decide.
    scores = {
        "aesthetic_score": round(rng.uniform(5.5, 7.5), 3),
        "watermark_score": round(rng.uniform(0.0, 0.2), 3),
        "nsfw_score": round(rng.uniform(0.0, 0.05), 3),
    }
    return CorpusItem(
        relpath=relpath,
        caption=scene.caption,
        width_px=width,
        height_px=height,
        aspect_label=label,
        expected_reason=expected,
        scores=scores,
    )


def _layout_size(
    label: str, aspect: float, *, max_side_px: int, rng: random.Random
) -> tuple[int, int]:
    if label == "too_small":
        side = max(2, max_side_px // 32)
        return side, side
    if label == "extreme":
        # Same short side as a 2.35:1 image, so only the aspect ratio can reject it.
        short_side = round(max_side_px / 2.35)
        return round(short_side * aspect), short_side
    longest = round(max_side_px * rng.uniform(0.8, 1.0))
    # A little aspect jitter so images fall *near* a bucket, as real photos do.
    jittered = aspect * rng.uniform(0.97, 1.03)
    if jittered >= 1.0:
        return longest, max(1, round(longest / jittered))
    return max(1, round(longest * jittered)), longest


def _random_scene(rng: random.Random) -> Scene:
    shape_colour, background_colour = rng.sample(sorted(COLOURS), 2)
    return Scene(
        shape=rng.choice(SHAPES),
        shape_colour=shape_colour,
        background_colour=background_colour,
        position=rng.choice(sorted(POSITIONS)),
    )


def render_scene(scene: Scene, *, width: int, height: int, rng: random.Random) -> Image.Image:
    """The scene's shape on its background colour, shaded by a random smooth field (RGB,
    width x height); the same scene, size and rng state give the same pixels."""
    field = _shading_field(width=width, height=height, rng=rng)[..., None]
    base = np.array(COLOURS[scene.background_colour], dtype=np.float32)
    pixels = base[None, None, :] * (1.0 + 0.6 * field) + 45.0 * field
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    centre_x, centre_y = POSITIONS[scene.position]
    centre_x = (centre_x + rng.uniform(-0.04, 0.04)) * width
    centre_y = (centre_y + rng.uniform(-0.04, 0.04)) * height
    radius = rng.uniform(0.14, 0.22) * min(width, height)
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    draw = ImageDraw.Draw(image)
    colour = COLOURS[scene.shape_colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif scene.shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        apex = (centre_x, centre_y - radius)
        draw.polygon([apex, (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


def _shading_field(*, width: int, height: int, rng: random.Random) -> np.ndarray:
    """Sum of random low-frequency waves in [-0.5, 0.5]: without it, pictures of one shape on
    a flat colour share their perceptual hash and the near-duplicate filter drops them."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / max(width, 1), ys / max(height, 1)
    field = np.zeros((height, width), dtype=np.float32)
    for _ in range(4):
        freq_x, freq_y = rng.randint(0, 3), rng.randint(1, 3) * rng.choice((-1, 1))
        if rng.random() < 0.5:
            freq_x, freq_y = freq_y, freq_x
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field += rng.uniform(0.3, 1.0) * np.cos(2.0 * np.pi * (freq_x * xs + freq_y * ys) + phase)
    spread = float(field.max() - field.min()) or 1.0
    return (field - field.min()) / spread - 0.5


def encode_image(image: Image.Image, image_format: str, **save_options: object) -> bytes:
    """The image as a file of `image_format` (PNG, JPEG, GIF, ...) with Pillow's save options."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


FOLDER_CAPTION_FORMS = ("txt", "json", "metadata", "none")
"""How `write_folder_corpus` captions its images, in turn: a .txt sidecar, a .json sidecar, a row
of metadata.jsonl (Hugging Face ImageFolder style) and none at all."""


def write_folder_corpus(root: Path, *, count: int, seed: int, max_side_px: int) -> list[CorpusItem]:
    """A local folder source like a fine-tuner's own: the synthetic images spread over two
    subfolders, each caption form of FOLDER_CAPTION_FORMS in turn. Item relpaths are relative
    to `root`."""
    root = Path(root)
    items, metadata = [], []
    for index in range(count):
        folder = root / ("people" if index % 2 else "places")
        folder.mkdir(parents=True, exist_ok=True)
        item = _write_synthetic_item(folder, index, seed + 7919, max_side_px)
        relpath = f"{folder.name}/{item.relpath}"
        form = FOLDER_CAPTION_FORMS[index % len(FOLDER_CAPTION_FORMS)]
        stem = folder / Path(item.relpath).stem
        if form == "txt":
            _write_bytes_atomic(stem.with_suffix(".txt"), item.caption.encode())
        elif form == "json":
            _write_bytes_atomic(
                stem.with_suffix(".json"), json.dumps({"caption": item.caption}).encode()
            )
        elif form == "metadata":
            metadata.append({"file_name": relpath, "caption": item.caption})
        # The caption is checked before the image, so an uncaptioned image is missing_caption.
        expected = "missing_caption" if form == "none" else item.expected_reason
        caption = None if form == "none" else item.caption
        items.append(
            CorpusItem(
                relpath=relpath,
                caption=caption,
                width_px=item.width_px,
                height_px=item.height_px,
                aspect_label=item.aspect_label,
                expected_reason=expected,
            )
        )
    lines = "".join(json.dumps(row) + "\n" for row in metadata)
    _write_bytes_atomic(root / "metadata.jsonl", lines.encode())
    return items


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp_path.write_bytes(data)
    os.replace(tmp_path, path)


def corpus_url_items(items: Sequence[CorpusItem], *, base_url: str) -> list[dict[str, object]]:
    """Url rows (url, caption, scores flattened) for items served at base_url."""
    base = base_url.rstrip("/")
    return [
        {"url": f"{base}/{item.relpath}", "caption": item.caption, **item.scores} for item in items
    ]


def write_url_list(items: Sequence[CorpusItem | Mapping[str, object]], path: Path) -> Path:
    """Write url rows to `path` (.parquet or .jsonl) atomically; returns path.

    Columns: url (str), caption (str or null), and each of SCORE_COLUMNS any row carries
    (float64, null where a row lacks it); other keys are not written. A CorpusItem becomes a
    row whose url is its relpath, which the pipeline resolves against the server's base url.
    """
    path = Path(path)
    mappings = [_url_row(item) for item in items]
    present = [name for name in SCORE_COLUMNS if any(name in row for row in mappings)]
    columns = ["url", "caption", *present]
    rows = [{name: row.get(name) for name in columns} for row in mappings]
    tmp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if path.suffix == ".parquet":
        schema = pa.schema(
            [("url", pa.string()), ("caption", pa.string())]
            + [(name, pa.float64()) for name in present]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path)
    elif path.suffix == ".jsonl":
        lines = [json.dumps(row, ensure_ascii=True) + "\n" for row in rows]
        tmp_path.write_text("".join(lines), encoding="ascii")
    else:
        raise ValueError(f"path: {path} must end in .parquet or .jsonl")
    os.replace(tmp_path, path)
    return path


def _url_row(item: CorpusItem | Mapping[str, object]) -> Mapping[str, object]:
    if isinstance(item, CorpusItem):
        return {"url": item.relpath, "caption": item.caption, **item.scores}
    return item
