"""The bad-input corpus: one url row per way a source can be broken, for the tests.

`write_bad_input_corpus` writes the files for every bad-input case and returns url rows
{case, url, caption, expected_reason} for a `RoutedLoopbackServer` (tests/loopback_routes.py)
that serves the same folder: the 404, slow, noai, text/html and redirect cases need its routes.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from components.data.demo_corpus import (
    COLOURS,
    KEPT,
    POSITIONS,
    SHAPES,
    Scene,
    encode_image,
    render_scene,
)

SLOW_SERVER_SECONDS = 6.0
"""How long the corpus's slow URL waits; any download timeout below it fails."""


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

    def _scene(self) -> Scene:
        shape, position = self._unused_layouts.pop()
        shape_colour, background_colour = self.rng.sample(sorted(COLOURS), 2)
        return Scene(
            shape=shape,
            shape_colour=shape_colour,
            background_colour=background_colour,
            position=position,
        )

    def _image(self, width: int, height: int) -> tuple[Image.Image, str]:
        scene = self._scene()
        return render_scene(scene, width=width, height=height, rng=self.rng), scene.caption

    def _file(self, name: str, data: bytes) -> str:
        relpath = f"bad_{name}"
        (self.out_dir / relpath).write_bytes(data)
        return f"{self.base_url}/{relpath}"

    def duplicate_cases(self) -> list[dict[str, object]]:
        image, caption = self._image(512, 512)
        data = encode_image(image, "JPEG", quality=90)
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
                self._file("near_copy.jpg", encode_image(near, "JPEG", quality=75)),
                caption,
                "near_duplicate",
            ),
        ]

    def transport_cases(self, closed_port_url: str) -> list[dict[str, object]]:
        slow_image, slow_caption = self._image(256, 256)
        slow_file = self._file("slow.jpg", encode_image(slow_image, "JPEG", quality=90))
        noai_image, noai_caption = self._image(256, 256)
        noai_file = self._file("noai.jpg", encode_image(noai_image, "JPEG", quality=90))
        html_image, html_caption = self._image(512, 288)
        html_file = self._file("served_as_html.jpg", encode_image(html_image, "JPEG", quality=90))
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
        jpeg = encode_image(truncated_image, "JPEG", quality=90)
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
                self._file("one_pixel.png", encode_image(tiny, "PNG")),
                "a red dot",
                "too_small",
            ),
            _case(
                "extreme_aspect",
                self._file("extreme_aspect.jpg", encode_image(wide_image, "JPEG", quality=90)),
                wide_caption,
                "aspect_out_of_range",
            ),
        ]

    def odd_image_cases(self) -> list[dict[str, object]]:
        cmyk, cmyk_caption = self._image(512, 256)
        layout = self._scene()
        gray_scene = Scene(
            shape=layout.shape,
            shape_colour="white",
            background_colour="black",
            position=layout.position,
        )
        gray = render_scene(gray_scene, width=512, height=512, rng=self.rng).convert("L")
        sixteen_bit = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
        missing, _ = self._image(512, 512)
        return [
            _case(
                "cmyk_jpeg",
                self._file("cmyk.jpg", encode_image(cmyk.convert("CMYK"), "JPEG", quality=90)),
                cmyk_caption,
                KEPT,
            ),
            _case(
                "png_16_bit",
                self._file("gray16.png", encode_image(sixteen_bit, "PNG")),
                gray_scene.caption,
                KEPT,
            ),
            self._palette_alpha_case(),
            self._animated_gif_case(),
            self._exif_rotated_case(),
            _case(
                "missing_caption",
                self._file("no_caption.jpg", encode_image(missing, "JPEG", quality=90)),
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
            self._file("palette_alpha.png", encode_image(palette, "PNG")),
            caption,
            KEPT,
        )

    def _animated_gif_case(self) -> dict[str, object]:
        scene = self._scene()
        frames = [render_scene(scene, width=512, height=288, rng=self.rng) for _ in range(3)]
        data = encode_image(
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
        data = encode_image(stored, "JPEG", quality=90, exif=exif.tobytes())
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
