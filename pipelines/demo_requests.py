"""The demo's batch-inference requests: one per generation mode, plus requests that must fail.

Reference images are the demo corpus's own images (the synthetic shapes the model trained on),
copied next to the requests file with an inpaint mask; the bad requests show per-row errors
(unknown mode, missing file, mask size mismatch, bad focus, unknown control kind) while the rest
of the batch completes. The ControlNet requests need `infer.controlnet` and `infer.depth_detector`
(the tiny preset points them at the tiny models the demo builds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

REFERENCE_COUNT = 2


def write_demo_requests(folder: Path, *, data_root: Path) -> Path:
    """Write `requests.jsonl`, reference images and masks into `folder`; returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    references = _reference_images(Path(data_root) / "corpus")
    names = []
    for index, image in enumerate(references):
        name = f"reference-{index}.png"
        image.save(folder / name)
        names.append(name)
    first = references[0]
    mask = Image.new("L", first.size, 0)
    ImageDraw.Draw(mask).ellipse(
        (first.width // 4, first.height // 4, 3 * first.width // 4, 3 * first.height // 4),
        fill=255,
    )
    mask.save(folder / "mask-0.png")
    Image.new("L", (first.width + 16, first.height), 255).save(folder / "mask-wrong-size.png")
    rows = _good_requests(names) + _bad_requests(names)
    path = folder / "requests.jsonl"
    temporary = folder / ".requests.jsonl.tmp"
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(temporary, path)
    return path


def _reference_images(corpus: Path) -> list[Image.Image]:
    """The first corpus images of a trainable size and aspect (the corpus also holds broken and
    extreme files on purpose)."""
    found = []
    for path in sorted(corpus.glob("img_*")):
        try:
            with Image.open(path) as opened:
                if not (64 <= min(opened.size) and max(opened.size) <= 1024):
                    continue
                if not 0.5 <= opened.width / opened.height <= 2.0:
                    continue
                found.append(opened.convert("RGB"))
        except OSError:
            continue
        if len(found) == REFERENCE_COUNT:
            return found
    raise FileNotFoundError(f"{corpus}: fewer than {REFERENCE_COUNT} usable reference images")


def _good_requests(names: list[str]) -> list[dict]:
    """One request per mode (and focus kind), plus a non-square aspect."""
    return [
        {
            "id": "text-red-circle",
            "mode": "text",
            "prompt": "a red circle in the centre on a blue background",
            "seed": 1,
        },
        {"id": "variation-0", "mode": "variation", "image": names[0], "seed": 2},
        {"id": "variation-1-seed-3", "mode": "variation", "image": names[1], "seed": 3},
        {
            "id": "image-text-0",
            "mode": "image_text",
            "image": names[0],
            "prompt": "the same shape in green",
            "seed": 4,
        },
        {"id": "img2img-0", "mode": "img2img", "image": names[1], "strength": 0.6, "seed": 5},
        {
            "id": "inpaint-0",
            "mode": "inpaint",
            "image": names[0],
            "mask": "mask-0.png",
            "strength": 0.9,
            "seed": 6,
        },
        {
            "id": "focus-circle-0",
            "mode": "variation",
            "image": names[0],
            "seed": 7,
            "focus": {"center_x": 0.5, "center_y": 0.5, "radius": 0.5},
        },
        {
            "id": "focus-grid-1",
            "mode": "variation",
            "image": names[1],
            "seed": 8,
            "focus": {"rows": 2, "columns": 2, "cells": [[0, 0], [1, 1]]},
        },
        {
            "id": "wide-text",
            "mode": "text",
            "prompt": "a yellow square",
            "aspect": "2:1",
            "seed": 9,
        },
        *_control_requests(names),
    ]


def _control_requests(names: list[str]) -> list[dict]:
    """ControlNet: depth on a text request, line on a variation."""
    return [
        {
            "id": "control-depth-0",
            "mode": "text",
            "prompt": "a red circle in the centre on a blue background",
            "control": [{"kind": "depth", "image": names[0], "strength": 0.8}],
            "seed": 10,
        },
        {
            "id": "control-line-1",
            "mode": "variation",
            "image": names[1],
            "control": [{"kind": "line", "image": names[1], "strength": 0.6}],
            "seed": 11,
        },
    ]


def _bad_requests(names: list[str]) -> list[dict]:
    """Requests that must each end as an error row naming their field."""
    return [
        {"id": "bad-mode", "mode": "sketch", "prompt": "anything"},
        {"id": "bad-missing-file", "mode": "variation", "image": "no-such-image.png"},
        {
            "id": "bad-mask-size",
            "mode": "inpaint",
            "image": names[0],
            "mask": "mask-wrong-size.png",
        },
        {
            "id": "bad-focus",
            "mode": "variation",
            "image": names[0],
            "focus": {"center_x": 0.5, "center_y": 0.5, "radius": -1},
        },
        {
            "id": "bad-control",
            "mode": "text",
            "prompt": "a blue circle",
            "control": [{"kind": "segmentation-xyz", "image": names[0], "strength": 1.0}],
        },
    ]
