"""Synthetic captioned images and a bad-input corpus for local runs and tests.

`write_synthetic_corpus` draws coloured shapes on coloured gradient backgrounds, deterministically
from a seed, covering the five aspect buckets (16:9, 2:1, 2.35:1, 1:1, 1:2) plus images the filters
must reject (too small, extreme aspect ratio); it returns one `CorpusItem` per file.
`write_bad_input_corpus` writes the files for every bad-input case and returns url rows
{case, url, caption, expected_reason} for a `LoopbackServer` that serves the same folder.
`write_url_list` writes url rows as Parquet or JSONL (columns url, caption, optional scores).
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance

SCORE_COLUMNS: tuple[str, ...] = ("aesthetic_score", "watermark_score", "nsfw_score")
KEPT = "kept"
SLOW_SERVER_SECONDS = 6.0
"""How long the bad-input corpus's slow URL waits; any download timeout below it fails."""

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
class _Scene:
    shape: str
    shape_colour: str
    background_colour: str
    position: str

    @property
    def caption(self) -> str:
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
    image = _render(scene, width=width, height=height, rng=rng)
    use_png = index % 4 == 3
    relpath = f"img_{index:05d}.{'png' if use_png else 'jpg'}"
    data = _encode(image, "PNG") if use_png else _encode(image, "JPEG", quality=90)
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


def _random_scene(rng: random.Random) -> _Scene:
    shape_colour, background_colour = rng.sample(sorted(COLOURS), 2)
    return _Scene(
        shape=rng.choice(SHAPES),
        shape_colour=shape_colour,
        background_colour=background_colour,
        position=rng.choice(sorted(POSITIONS)),
    )


def _render(scene: _Scene, *, width: int, height: int, rng: random.Random) -> Image.Image:
    """The scene's shape on its background colour, shaded by a random smooth field."""
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


def _encode(image: Image.Image, image_format: str, **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


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


def write_bad_input_corpus(
    out_dir: Path, *, server_base_url: str, closed_port_url: str, seed: int
) -> list[dict[str, object]]:
    """Write every bad-input case under out_dir; returns rows {case, url, caption, expected_reason}.

    URLs assume a LoopbackServer serving out_dir at server_base_url. Decisions encoded here:
    image bytes served as text/html are kept (the bytes decide, not the header); CMYK, 16-bit,
    palette+alpha, animated GIF and EXIF-rotated images are valid and kept; the first of two
    rows sharing a URL or image is kept and the later one is the duplicate.
    """
    files = _BadCorpusFiles(Path(out_dir), base_url=server_base_url.rstrip("/"), seed=seed)
    return [
        *files.duplicate_cases(),
        *files.transport_cases(closed_port_url),
        *files.broken_file_cases(),
        *files.odd_image_cases(),
    ]


class _BadCorpusFiles:
    """Writes the bad-input files; each rendered image gets its own shape and position."""

    def __init__(self, out_dir: Path, *, base_url: str, seed: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.base_url = base_url
        self.rng = random.Random(seed)
        layouts = [(shape, position) for shape in SHAPES for position in sorted(POSITIONS)]
        self.rng.shuffle(layouts)
        self._unused_layouts = layouts

    def _scene(self) -> _Scene:
        shape, position = self._unused_layouts.pop()
        shape_colour, background_colour = self.rng.sample(sorted(COLOURS), 2)
        return _Scene(
            shape=shape,
            shape_colour=shape_colour,
            background_colour=background_colour,
            position=position,
        )

    def _image(self, width: int, height: int) -> tuple[Image.Image, str]:
        scene = self._scene()
        return _render(scene, width=width, height=height, rng=self.rng), scene.caption

    def _file(self, name: str, data: bytes) -> str:
        relpath = f"bad_{name}"
        _write_bytes_atomic(self.out_dir / relpath, data)
        return f"{self.base_url}/{relpath}"

    def duplicate_cases(self) -> list[dict[str, object]]:
        image, caption = self._image(512, 512)
        data = _encode(image, "JPEG", quality=90)
        url = self._file("reference.jpg", data)
        near = ImageEnhance.Brightness(image).enhance(1.04)
        return [
            _case("reference", url, caption, KEPT),
            _case("duplicate_url", url, caption + ", again", "duplicate_url"),
            _case(
                "exact_duplicate", self._file("exact_copy.jpg", data), caption, "exact_duplicate"
            ),
            _case(
                "near_duplicate",
                self._file("near_copy.jpg", _encode(near, "JPEG", quality=75)),
                caption,
                "near_duplicate",
            ),
        ]

    def transport_cases(self, closed_port_url: str) -> list[dict[str, object]]:
        slow_image, slow_caption = self._image(256, 256)
        slow_file = self._file("slow.jpg", _encode(slow_image, "JPEG", quality=90))
        noai_image, noai_caption = self._image(256, 256)
        noai_file = self._file("noai.jpg", _encode(noai_image, "JPEG", quality=90))
        html_image, html_caption = self._image(512, 288)
        html_file = self._file("served_as_html.jpg", _encode(html_image, "JPEG", quality=90))
        relative = len(self.base_url) + 1
        return [
            _case("http_404", f"{self.base_url}/status/404", "a page that is gone", "http_404"),
            _case("connection_refused", closed_port_url, "nobody listens", "connection_refused"),
            _case(
                "slow_server",
                f"{self.base_url}/slow/{SLOW_SERVER_SECONDS:g}/{slow_file[relative:]}",
                slow_caption,
                "timeout",
            ),
            _case(
                "robots_noai",
                f"{self.base_url}/noai/{noai_file[relative:]}",
                noai_caption,
                "robots_disallowed",
            ),
            _case(
                "wrong_content_type",
                f"{self.base_url}/as-html/{html_file[relative:]}",
                html_caption,
                KEPT,
            ),
            _case(
                "redirect_to_metadata",
                f"{self.base_url}/redirect?to=http://169.254.169.254/latest/meta-data/",
                "a public image that bounces to the cloud metadata service",
                "redirect_refused",
            ),
            _case("ftp_url", "ftp://127.0.0.1/pub/image.jpg", "an ftp image", "scheme_not_allowed"),
            _case(
                "metadata_url",
                "http://169.254.169.254/latest/meta-data/",
                "cloud credentials",
                "metadata_address",
            ),
        ]

    def broken_file_cases(self) -> list[dict[str, object]]:
        not_image = b"<html><body>This is not an image.</body></html>\n"
        truncated_image, truncated_caption = self._image(512, 512)
        jpeg = _encode(truncated_image, "JPEG", quality=90)
        tiny = Image.new("RGB", (1, 1), COLOURS["red"])
        wide_image, wide_caption = self._image(960, 120)
        return [
            _case(
                "non_image_bytes",
                self._file("not_an_image.jpg", not_image),
                "a web page",
                "decode_error",
            ),
            _case(
                "truncated_jpeg",
                self._file("truncated.jpg", jpeg[: len(jpeg) * 3 // 5]),
                truncated_caption,
                "decode_error",
            ),
            _case(
                "decompression_bomb",
                self._file("bomb.png", _decompression_bomb_png(20_000, 20_000)),
                "a huge gray square",
                "decompression_bomb",
            ),
            _case(
                "one_pixel",
                self._file("one_pixel.png", _encode(tiny, "PNG")),
                "a red dot",
                "too_small",
            ),
            _case(
                "extreme_aspect",
                self._file("extreme_aspect.jpg", _encode(wide_image, "JPEG", quality=90)),
                wide_caption,
                "aspect_out_of_range",
            ),
        ]

    def odd_image_cases(self) -> list[dict[str, object]]:
        cmyk, cmyk_caption = self._image(512, 256)
        layout = self._scene()
        gray_scene = _Scene(
            shape=layout.shape,
            shape_colour="white",
            background_colour="black",
            position=layout.position,
        )
        gray = _render(gray_scene, width=512, height=512, rng=self.rng).convert("L")
        sixteen_bit = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
        missing, _ = self._image(512, 512)
        return [
            _case(
                "cmyk_jpeg",
                self._file("cmyk.jpg", _encode(cmyk.convert("CMYK"), "JPEG", quality=90)),
                cmyk_caption,
                KEPT,
            ),
            _case(
                "png_16_bit",
                self._file("gray16.png", _encode(sixteen_bit, "PNG")),
                gray_scene.caption,
                KEPT,
            ),
            self._palette_alpha_case(),
            self._animated_gif_case(),
            self._exif_rotated_case(),
            _case(
                "missing_caption",
                self._file("no_caption.jpg", _encode(missing, "JPEG", quality=90)),
                None,
                "missing_caption",
            ),
        ]

    def _palette_alpha_case(self) -> dict[str, object]:
        image, caption = self._image(512, 512)
        rgba = image.convert("RGBA")
        alpha = np.full((512, 512), 255, dtype=np.uint8)
        alpha[:8, :] = 0  # a transparent strip along the top edge
        rgba.putalpha(Image.fromarray(alpha))
        palette = rgba.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
        return _case(
            "palette_alpha_png",
            self._file("palette_alpha.png", _encode(palette, "PNG")),
            caption,
            KEPT,
        )

    def _animated_gif_case(self) -> dict[str, object]:
        scene = self._scene()
        frames = [_render(scene, width=512, height=288, rng=self.rng) for _ in range(3)]
        data = _encode(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=120, loop=0
        )
        return _case("animated_gif", self._file("animated.gif", data), scene.caption, KEPT)

    def _exif_rotated_case(self) -> dict[str, object]:
        # Stored landscape 512x288; Orientation 6 (rotate 90 clockwise) shows it as 288x512,
        # which is the upright image the caption describes.
        upright, caption = self._image(288, 512)
        stored = upright.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        data = _encode(stored, "JPEG", quality=90, exif=exif.tobytes())
        return _case("exif_rotated_jpeg", self._file("exif_rotated.jpg", data), caption, KEPT)


def _case(case: str, url: str, caption: str | None, expected_reason: str) -> dict[str, object]:
    return {"case": case, "url": url, "caption": caption, "expected_reason": expected_reason}


def _decompression_bomb_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit grayscale PNG of width x height that compresses to a few KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    block_rows = 1000
    idat = b"".join(
        compressor.compress(row * min(block_rows, height - start))
        for start in range(0, height, block_rows)
    )
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    checksum = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", checksum)
