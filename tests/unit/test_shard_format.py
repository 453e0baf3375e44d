"""The shard format: tensor cells round-trip bit-exactly, files are atomic and versioned."""

import pyarrow.parquet as pq
import pytest
import torch

from components.data import shard_format

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int32, torch.int8]
)
def test_tensor_cell_round_trip_is_bit_exact(dtype):
    source = (torch.randn(3, 5) * 4).to(dtype)
    data, dtype_name, shape = shard_format.tensor_to_cell(source)
    assert len(data) == source.numel() * source.element_size()
    back = shard_format.cell_to_tensor(data, dtype_name, shape)
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back.view(torch.uint8), source.contiguous().view(torch.uint8))


def test_bfloat16_is_stored_as_its_little_endian_bits():
    data, dtype_name, _ = shard_format.tensor_to_cell(torch.tensor([1.0], dtype=torch.bfloat16))
    assert dtype_name == "bfloat16" and data == bytes([0x80, 0x3F])


def _row(key: str, length: int) -> dict:
    row = {
        "sample_key": key,
        "source": "web",
        "url": f"http://x/{key}",
        "caption": "c",
        "caption_origin": "given",
        "caption_truncated": False,
        "caption_model": "",
        "bucket_id": "64x64",
        "width_px": 64,
        "height_px": 64,
        "source_width_px": 80,
        "source_height_px": 70,
        "image_sha256": "0" * 64,
    }
    for name in shard_format.REQUIRED_TENSORS:
        row[name] = torch.arange(length * 2, dtype=torch.float32).reshape(length, 2)
    return row


def test_write_read_round_trip_with_row_groups(tmp_path):
    path = shard_format.shard_path(tmp_path, "64x64", 3)
    rows = [_row(f"{i:03d}", length=2 + i) for i in range(5)]
    info = shard_format.write_shard(rows, path, max_row_group_bytes=1024)
    assert path.name == "part-00003.parquet" and path.parent.name == "bucket=64x64"
    assert info.num_rows == 5 and pq.read_metadata(path).num_row_groups > 1
    samples = list(shard_format.iter_samples(shard_format.read_shard(path)))
    assert [sample["sample_key"] for sample in samples] == [row["sample_key"] for row in rows]
    for sample, row in zip(samples, rows, strict=True):
        assert torch.equal(sample["caption_prompt_hidden"], row["caption_prompt_hidden"])
    assert shard_format.list_shards(tmp_path) == [path]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "part.parquet"
    bad = _row("a", 2)
    del bad["clip_pooled"]
    with pytest.raises(KeyError):
        shard_format.write_shard([bad], path, max_row_group_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(shard_format.ShardFormatError, match="empty shard"):
        shard_format.write_shard([], path, max_row_group_bytes=1 << 20)


def test_version_mismatch_and_corruption_name_the_file(tmp_path):
    path = tmp_path / "part.parquet"
    shard_format.write_shard([_row("a", 2)], path, max_row_group_bytes=1 << 20)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({"qwenflux_format_version": "0"}), path)
    with pytest.raises(
        shard_format.ShardFormatError, match=r"part\.parquet: shard format version 0"
    ):
        shard_format.read_shard(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(shard_format.ShardFormatError, match="unreadable"):
        shard_format.read_shard(path)
    with pytest.raises(shard_format.ShardFormatError, match="no manifest"):
        shard_format.read_manifest(tmp_path)
    shard_format.write_manifest(tmp_path, {"x": 1, "version": 1})
    shard_format.write_manifest(tmp_path, {"x": 2, "version": 2})
    assert shard_format.read_manifest(tmp_path)["x"] == 2
    assert shard_format.read_manifest(tmp_path, 1)["x"] == 1
    assert shard_format.list_versions(tmp_path) == [1, 2]
    with pytest.raises(shard_format.ShardFormatError, match=r"no dataset version 3 .*\[1, 2\]"):
        shard_format.read_manifest(tmp_path, 3)


def test_t5_caption_states_are_columns_only_when_rows_carry_them(tmp_path):
    plain = shard_format.write_shard(
        [_row("a", 2)], tmp_path / "a.parquet", max_row_group_bytes=1 << 20
    )
    assert "caption_t5_hidden" not in pq.read_schema(plain.path).names
    row = _row("b", 2) | {"caption_t5_hidden": torch.randn(256, 4).to(torch.bfloat16)}
    path = tmp_path / "b.parquet"
    shard_format.write_shard([row], path, max_row_group_bytes=1 << 20)
    schema = pq.read_schema(path)
    assert schema.equals(
        shard_format.shard_schema(shard_format.tensor_names(False, has_t5=True)),
        check_metadata=False,
    )
    (sample,) = shard_format.iter_samples(shard_format.read_shard(path))
    assert torch.equal(sample["caption_t5_hidden"], row["caption_t5_hidden"])
    scaled = shard_format.tensor_names(True, has_t5=True)
    assert scaled[-2:] == ("caption_t5_hidden", "caption_t5_hidden_scale")
    assert shard_format.has_t5_caption({"encoders": {"t5_caption": {"max_tokens": 256}}})
    assert not shard_format.has_t5_caption({"encoders": {"t5_caption": None}})


def test_format_3_datasets_still_read_and_older_ones_are_refused(tmp_path):
    path = tmp_path / "part.parquet"
    shard_format.write_shard([_row("a", 2)], path, max_row_group_bytes=1 << 20)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({"qwenflux_format_version": "3"}), path)
    assert shard_format.read_shard(path).num_rows == 1
    shard_format.write_json_atomic(tmp_path / "manifest.json", {"format_version": 3, "x": 1})
    assert shard_format.read_manifest(tmp_path)["x"] == 1
    shard_format.write_json_atomic(tmp_path / "manifest.json", {"format_version": 2})
    with pytest.raises(
        shard_format.ShardFormatError, match="format version 2, this code reads 3 and 4"
    ):
        shard_format.read_manifest(tmp_path)
