"""Demo corpus: deterministic per seed, all five aspect buckets; and the tests' bad-input corpus
(tests/bad_input_corpus.py): every case as built."""

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from components.data.demo_corpus import (
    COLOURS,
    POSITIONS,
    SHAPES,
    CorpusItem,
    write_synthetic_corpus,
    write_url_list,
)
from tests.bad_input_corpus import write_bad_input_corpus

pytestmark = pytest.mark.unit

BUCKET_ASPECTS = {"16:9": 16 / 9, "2:1": 2.0, "2.35:1": 2.35, "1:1": 1.0, "1:2": 0.5}
BAD_CASES = {
    "redirect_to_metadata": "redirect_refused",
    "reference": "kept",
    "duplicate_url": "duplicate_url",
    "exact_duplicate": "exact_duplicate",
    "near_duplicate": "near_duplicate",
    "http_404": "http_404",
    "connection_refused": "connection_refused",
    "slow_server": "timeout",
    "robots_noai": "robots_disallowed",
    "wrong_content_type": "kept",
    "ftp_url": "scheme_not_allowed",
    "metadata_url": "metadata_address",
    "non_image_bytes": "decode_error",
    "truncated_jpeg": "decode_error",
    "decompression_bomb": "decompression_bomb",
    "one_pixel": "too_small",
    "extreme_aspect": "aspect_out_of_range",
    "cmyk_jpeg": "kept",
    "png_16_bit": "kept",
    "palette_alpha_png": "kept",
    "animated_gif": "kept",
    "exif_rotated_jpeg": "kept",
    "missing_caption": "missing_caption",
}
BASE = "http://127.0.0.1:9"


def _file_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _nearest_bucket(width, height):
    aspect = width / height
    return min(BUCKET_ASPECTS, key=lambda name: abs(math.log(aspect / BUCKET_ASPECTS[name])))


def test_synthetic_corpus_is_deterministic_per_seed(tmp_path):
    first = write_synthetic_corpus(tmp_path / "a", count=12, seed=3, max_side_px=96)
    again = write_synthetic_corpus(tmp_path / "b", count=12, seed=3, max_side_px=96)
    other = write_synthetic_corpus(tmp_path / "c", count=12, seed=4, max_side_px=96)
    assert first == again
    assert _file_bytes(tmp_path / "a") == _file_bytes(tmp_path / "b")
    assert _file_bytes(tmp_path / "a") != _file_bytes(tmp_path / "c")
    assert [item.caption for item in first] != [item.caption for item in other]


def test_synthetic_corpus_covers_buckets_and_rejects(tmp_path):
    items = write_synthetic_corpus(tmp_path, count=12, seed=0, max_side_px=160)
    kept = [item for item in items if item.expected_reason == "kept"]
    assert {_nearest_bucket(item.width_px, item.height_px) for item in kept} == set(BUCKET_ASPECTS)
    assert all(_nearest_bucket(i.width_px, i.height_px) == i.aspect_label for i in kept)
    assert all(max(item.width_px, item.height_px) <= 160 for item in kept)
    rejected = {item.expected_reason for item in items} - {"kept"}
    assert rejected == {"too_small", "aspect_out_of_range"}
    formats = set()
    for item in items:
        with Image.open(tmp_path / item.relpath) as image:
            assert image.size == (item.width_px, item.height_px)
            formats.add(image.format)
    assert formats == {"JPEG", "PNG"}


def test_captions_say_colour_shape_and_position(tmp_path):
    for item in write_synthetic_corpus(tmp_path, count=12, seed=1, max_side_px=64):
        words = item.caption
        assert any(f" {shape} " in words for shape in SHAPES)
        assert any(f"in the {position} " in words for position in POSITIONS)
        assert sum(f" {colour} " in f"{words} " for colour in COLOURS) >= 2
        assert words.endswith(" background") and words.isascii()
        assert set(item.scores) == {"aesthetic_score", "watermark_score", "nsfw_score"}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    refused = "http://127.0.0.1:1/x"
    rows = write_bad_input_corpus(folder, server_base_url=BASE, closed_port_url=refused, seed=5)
    return folder, rows


def _open(folder, row):
    return Image.open(folder / row["url"].rsplit("/", 1)[1])


def test_bad_corpus_has_every_case_with_its_reason(bad_corpus):
    _, rows = bad_corpus
    assert {row["case"]: row["expected_reason"] for row in rows} == BAD_CASES
    by_case = {row["case"]: row for row in rows}
    assert by_case["duplicate_url"]["url"] == by_case["reference"]["url"]
    order = [row["case"] for row in rows]
    assert order.index("reference") < order.index("near_duplicate")
    assert by_case["missing_caption"]["caption"] is None
    assert by_case["metadata_url"]["url"].startswith("http://169.254.169.254/")
    assert by_case["ftp_url"]["url"].startswith("ftp://")
    assert by_case["connection_refused"]["url"] == "http://127.0.0.1:1/x"


def test_bad_corpus_is_deterministic(bad_corpus, tmp_path):
    folder, rows = bad_corpus
    again = write_bad_input_corpus(tmp_path, server_base_url=BASE, closed_port_url="x", seed=5)
    assert _file_bytes(folder) == _file_bytes(tmp_path)
    assert [row["caption"] for row in rows] == [row["caption"] for row in again]


def test_bad_corpus_files_are_what_they_claim(bad_corpus):
    folder, rows = bad_corpus
    by_case = {row["case"]: row for row in rows}
    with _open(folder, by_case["exif_rotated_jpeg"]) as image:
        assert image.width > image.height and image.getexif()[0x0112] == 6
        upright = ImageOps.exif_transpose(image)
        assert upright.size == (image.height, image.width)
    with _open(folder, by_case["cmyk_jpeg"]) as image:
        assert image.mode == "CMYK"
    with _open(folder, by_case["png_16_bit"]) as image:
        assert image.mode.startswith("I;16")
    with _open(folder, by_case["palette_alpha_png"]) as image:
        assert image.mode == "P" and "transparency" in image.info
    with _open(folder, by_case["animated_gif"]) as image:
        assert image.n_frames > 1
    with _open(folder, by_case["one_pixel"]) as image:
        assert image.size == (1, 1)
    with _open(folder, by_case["extreme_aspect"]) as image:
        assert image.width / image.height >= 5
    with _open(folder, by_case["truncated_jpeg"]) as image, pytest.raises(OSError):
        image.load()
    with pytest.raises(Image.UnidentifiedImageError):
        _open(folder, by_case["non_image_bytes"])


def test_bomb_declares_huge_size_in_a_small_file(bad_corpus):
    folder, rows = bad_corpus
    (bomb,) = [row for row in rows if row["case"] == "decompression_bomb"]
    path = folder / bomb["url"].rsplit("/", 1)[1]
    assert path.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def test_duplicates_share_or_nearly_share_bytes(bad_corpus):
    folder, rows = bad_corpus
    files = {row["case"]: (folder / row["url"].rsplit("/", 1)[1]).read_bytes() for row in rows[:4]}
    assert files["exact_duplicate"] == files["reference"]
    assert files["near_duplicate"] != files["reference"]
    reference = Image.open(io.BytesIO(files["reference"])).convert("L")
    near = Image.open(io.BytesIO(files["near_duplicate"])).convert("L")
    assert reference.size == near.size
    difference = np.abs(np.asarray(reference, dtype=np.int16) - np.asarray(near, dtype=np.int16))
    assert 0 < difference.mean() < 12


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_write_url_list_round_trips(tmp_path, suffix):
    items = [
        CorpusItem(relpath="img_0.jpg", caption="a red circle", width_px=4, height_px=4),
        {"url": "http://127.0.0.1:9/b.jpg", "caption": None, "aesthetic_score": 6.0, "case": "x"},
    ]
    path = write_url_list(items, tmp_path / f"urls{suffix}")
    if suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"url": "img_0.jpg", "caption": "a red circle", "aesthetic_score": None},
        {"url": "http://127.0.0.1:9/b.jpg", "caption": None, "aesthetic_score": 6.0},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"urls{suffix}"]


def test_write_url_list_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="path"):
        write_url_list([], tmp_path / "urls.csv")


def test_synthetic_images_are_not_near_duplicates_of_each_other(tmp_path):
    """The pipeline's pHash dedup (distance <= 4) must keep every synthetic image."""
    from components.data.filters import find_duplicates, normalise_image, perceptual_hash

    items = write_synthetic_corpus(tmp_path, count=48, seed=0, max_side_px=160)
    entries = []
    for item in items:
        data = (tmp_path / item.relpath).read_bytes()
        phash = perceptual_hash(normalise_image(data, max_pixels=10**7))
        entries.append((item.relpath, item.relpath, phash))
    assert find_duplicates(entries, max_distance=4) == {}
