"""Chunk-level rules of the data workflow that need no Ray: the
guard that keeps a dying run from recording its own source's death as url failures, and the
fitted-image files that carry each image, decoded and fitted once, from the chunk task to the
encoder."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.buckets import Bucket
from components.data.loopback_server import LoopbackServer, closed_port_url
from pipelines import data_layout
from pipelines.data_chunks import SourceGoneError, _check_source_alive, _resolve_url
from pipelines.data_layout import DataLayout, FittedImageWriter, read_fitted_slices

pytestmark = pytest.mark.unit


def test_relative_urls_resolve_only_against_a_served_source():
    assert _resolve_url("img/1.jpg", "http://127.0.0.1:9/") == "http://127.0.0.1:9/img/1.jpg"
    assert _resolve_url("https://x.org/1.jpg", "http://127.0.0.1:9/") == "https://x.org/1.jpg"
    assert _resolve_url("img/1.jpg", "") == "img/1.jpg"


def test_refused_rows_against_a_dead_served_source_are_not_recorded(tmp_path):
    dead_base = closed_port_url().rsplit("/", 1)[0] + "/"
    rows = [{"url": f"{dead_base}a.jpg", "status": "connection_refused"}]
    with pytest.raises(SourceGoneError, match="is gone"):
        _check_source_alive(rows, dead_base)
    with LoopbackServer(tmp_path) as server:
        alive = [{"url": f"{server.base_url}/status/404", "status": "connection_refused"}]
        _check_source_alive(alive, server.base_url)
    external = [{"url": "http://203.0.113.9/a.jpg", "status": "timeout"}]
    _check_source_alive(external, dead_base)
    _check_source_alive(rows, "")


WIDE = Bucket("32x16", "2:1", 32, 16)
SQUARE = Bucket("16x16", "1:1", 16, 16)


def _noise(bucket, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (bucket.height_px, bucket.width_px, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _write_fitted(layout, samples):
    with FittedImageWriter(layout, 3) as writer:
        for key, bucket, image in samples:
            writer.add(key, bucket, image)


def test_fitted_images_come_back_exactly_in_slices_without_later_duplicates(tmp_path, monkeypatch):
    # Row groups of two wide images, so slices cross row groups.
    monkeypatch.setattr(data_layout, "FITTED_ROW_GROUP_BYTES", 2 * 32 * 16 * 3)
    layout = DataLayout(tmp_path)
    samples = [
        (f"{i:09d}", WIDE if i % 3 else SQUARE, _noise(WIDE if i % 3 else SQUARE, i))
        for i in range(12)
    ]
    _write_fitted(layout, samples)
    assert sorted(p.name for p in layout.chunk_fitted_dir(3).iterdir()) == [
        "bucket=16x16.parquet",
        "bucket=32x16.parquet",
    ]
    wide = [(key, image) for key, bucket, image in samples if bucket is WIDE]
    keys = [key for key, _ in wide if key != "000000004"]  # 4: a duplicate found later
    path = layout.fitted_images(3, "32x16")
    assert pq.ParquetFile(path).num_row_groups == 4
    slices = list(read_fitted_slices(path, keys, WIDE, slice_rows=3))
    assert [slice_keys for slice_keys, _ in slices] == [keys[0:3], keys[3:6], keys[6:]]
    originals = dict(wide)
    for slice_keys, images in slices:
        for key, image in zip(slice_keys, images, strict=True):
            assert image.tobytes() == originals[key].tobytes()


def test_fitted_reader_refuses_missing_or_misordered_keys(tmp_path):
    layout = DataLayout(tmp_path)
    _write_fitted(layout, [(f"k{i}", SQUARE, _noise(SQUARE, i)) for i in range(3)])
    path = layout.fitted_images(3, "16x16")
    with pytest.raises(FileNotFoundError, match="k9"):
        list(read_fitted_slices(path, ["k0", "k9"], SQUARE, slice_rows=8))
    with pytest.raises(ValueError, match="out of order"):
        list(read_fitted_slices(path, ["k1", "k0"], SQUARE, slice_rows=8))
    with pytest.raises(FileNotFoundError, match="redoes the chunk"):
        list(read_fitted_slices(layout.fitted_images(3, "32x16"), ["k0"], WIDE, slice_rows=8))


def test_fitted_writer_leaves_nothing_on_error_and_clears_an_earlier_attempt(tmp_path, monkeypatch):
    monkeypatch.setattr(data_layout, "FITTED_ROW_GROUP_BYTES", 1)
    layout = DataLayout(tmp_path)
    _write_fitted(layout, [("k0", SQUARE, _noise(SQUARE, 0))])
    with pytest.raises(RuntimeError, match="killed"):
        with FittedImageWriter(layout, 3) as writer:
            writer.add("k0", WIDE, _noise(WIDE, 0))
            writer.add("k1", WIDE, _noise(WIDE, 1))
            assert len(list(layout.chunk_fitted_dir(3).glob(".*.tmp-*"))) == 1
            raise RuntimeError("killed")
    assert list(layout.chunk_fitted_dir(3).glob("*")) == []
    with pytest.raises(ValueError, match="16x16"):
        with FittedImageWriter(layout, 3) as writer:
            writer.add("k0", SQUARE, _noise(WIDE, 0))
