"""parquet_image_source on files written in tmp_path: HF struct and plain binary layouts,
every refusal by reason, listing that never reads the image column, path expansion."""

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data import parquet_image_source
from components.data.parquet_image_source import (
    DEFAULT_MAX_IMAGE_BYTES,
    PARQUET_IMAGE_REASONS,
    ParquetImageEntry,
    ParquetImageSourceConfig,
    expand_parquet_paths,
    list_parquet_file,
    read_images,
)

pytestmark = pytest.mark.unit

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(shade, size=(4, 3)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 255 - shade, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def _config(path, **fields):
    return ParquetImageSourceConfig(paths=(str(path),), **fields)


def _list(path, **fields):
    return list_parquet_file(path, _config(path, **fields))


def _read(path, rows, **fields):
    return read_images(path, rows, _config(path, **fields))


def _reasons(results):
    return [result[1] for result in results]


def _write(path, columns, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **options)
    return str(path)


def _hf_file(path, images, captions, row_group_size=3):
    structs = [None if image is None else {"bytes": image, "path": None} for image in images]
    columns = {"image": pa.array(structs, type=HF_IMAGE), "text": pa.array(captions, pa.string())}
    return _write(path, columns, row_group_size=row_group_size)


def test_hf_struct_layout_lists_captions_and_reads_bytes_across_row_groups(tmp_path):
    images = [_png(shade) for shade in range(0, 240, 30)]
    captions = ["  a red cat \n", "b", None, "   ", "e", "f", "g", "h"]
    path = _hf_file(tmp_path / "train-00000.parquet", images, captions)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    entries = _list(path)
    assert [entry.locator for entry in entries] == [
        f"train-00000.parquet::{row}" for row in range(8)
    ]
    assert [entry.row_index for entry in entries] == list(range(8))
    assert all(entry.path == path and entry.rejection is None for entry in entries)
    assert [entry.caption for entry in entries] == ["a red cat", "b", None, None, *"efgh"]
    assert [entry.caption_from for entry in entries[:4]] == ["column", "column", "none", "none"]
    assert (entries[2].detail, entries[3].detail) == ("caption is null", "caption is blank")
    rows = [7, 0, 4, 4, 2, 5]
    assert _read(path, rows) == [(images[row], None, "") for row in rows]
    assert _read(path, []) == []


@pytest.mark.parametrize("image_type", [pa.binary(), pa.large_binary(), pa.binary_view()])
def test_plain_binary_columns(tmp_path, image_type):
    images = [_png(10), _png(20), _png(30), _png(40)]
    columns = {"picture": pa.array(images, image_type), "caption": ["w", "x", "y", "z"]}
    path = _write(tmp_path / "plain.parquet", columns, row_group_size=2)
    config = _config(path, image_column="picture", caption_column="caption")
    entries = list_parquet_file(path, config)
    assert [entry.caption for entry in entries] == ["w", "x", "y", "z"]
    rows = [3, 1]
    assert read_images(path, rows, config) == [(images[row], None, "") for row in rows]


def test_dictionary_and_large_string_captions(tmp_path):
    captions = pa.array(["same", "same", None]).dictionary_encode()
    alt = pa.array(["q"] * 3, pa.large_string())
    path = _write(tmp_path / "dict.parquet", {"image": [b"x"] * 3, "text": captions, "alt": alt})
    assert [entry.caption for entry in _list(path)] == ["same", "same", None]
    alt = _list(path, caption_column="alt")
    assert [entry.caption for entry in alt] == ["q", "q", "q"]


def test_empty_caption_column_setting_means_no_captions(tmp_path):
    path = _write(tmp_path / "nocap.parquet", {"image": [_png(1), _png(2)]})
    entries = _list(path, caption_column="")
    assert [
        (entry.caption, entry.caption_from, entry.rejection, entry.detail) for entry in entries
    ] == [(None, "none", None, "")] * 2


def test_empty_row_groups_and_empty_files(tmp_path):
    images = [_png(shade) for shade in (1, 2, 3, 4, 5)]
    table = pa.table({"image": images, "text": list("abcde")})
    path = str(tmp_path / "gaps.parquet")
    with pq.ParquetWriter(path, table.schema) as writer:
        for start, length in ((0, 2), (0, 0), (2, 3)):
            writer.write_table(table.slice(start, length))
    assert pq.ParquetFile(path).metadata.row_group(1).num_rows == 0
    assert [entry.caption for entry in _list(path)] == list("abcde")
    assert _read(path, [2, 1, 4]) == [(images[row], None, "") for row in (2, 1, 4)]
    empty = _write(tmp_path / "empty.parquet", {"image": pa.array([], pa.binary()), "text": []})
    assert _list(empty) == []


def test_all_null_caption_column_is_no_captions(tmp_path):
    path = _write(tmp_path / "nulls.parquet", {"image": [_png(1), _png(2)], "text": [None, None]})
    assert pq.read_schema(path).field("text").type == pa.null()
    entries = _list(path)
    assert [(entry.caption, entry.rejection, entry.detail) for entry in entries] == [
        (None, None, "caption is null")
    ] * 2


def _unreadable_files(tmp_path):
    good = _hf_file(tmp_path / "good.parquet", [_png(1)] * 4, list("abcd"))
    data = open(good, "rb").read()
    files = {
        "zero": b"",
        "magic_only": b"PAR1",
        "junk": b"this is not parquet at all" * 10,
        "truncated": data[:-9],
        "cut_in_half": data[: len(data) // 2],
        "bad_footer": data[:-12] + b"\xff" * 8 + data[-4:],
    }
    paths = {}
    for name, content in files.items():
        (tmp_path / f"{name}.parquet").write_bytes(content)
        paths[name] = str(tmp_path / f"{name}.parquet")
    paths["missing"] = str(tmp_path / "missing.parquet")
    paths["folder"] = str(tmp_path / "folder.parquet")
    os.mkdir(paths["folder"])
    paths["fifo"] = str(tmp_path / "fifo.parquet")
    os.mkfifo(paths["fifo"])
    return paths


def test_unreadable_files_are_one_refused_entry_each(tmp_path):
    for name, path in _unreadable_files(tmp_path).items():
        [entry] = _list(path)
        assert (entry.locator, entry.row_index, entry.rejection) == (
            f"{os.path.basename(path)}::file",
            None,
            "unreadable_file",
        ), name
        assert entry.detail, name
        results = _read(path, [0, 1])
        assert [result[:2] for result in results] == [(None, "unreadable_file")] * 2, name


@pytest.mark.parametrize(
    ("columns", "seen"),
    [
        ({"picture": [b"x"], "text": ["a"]}, "no column 'image'; columns: ['picture', 'text']"),
        ({"image": [1], "text": ["a"]}, "column 'image' has type int64"),
        ({"image": pa.array(["s"], pa.string()), "text": ["a"]}, "has type string"),
        ({"image": [{"path": "a.png"}], "text": ["a"]}, "struct<path: string>"),
        ({"image": [{"bytes": "text"}], "text": ["a"]}, "struct<bytes: string>"),
        ({"image": [[b"x"]], "text": ["a"]}, "list<element: binary>"),
    ],
    ids=["missing", "int", "string", "struct_without_bytes", "struct_text_bytes", "list"],
)
def test_no_image_column(tmp_path, columns, seen):
    path = _write(tmp_path / "bad.parquet", columns)
    [entry] = _list(path)
    assert (entry.locator, entry.rejection) == ("bad.parquet::file", "no_image_column")
    assert seen in entry.detail
    assert _read(path, [0])[0][:2] == (
        None,
        "no_image_column",
    )


def test_duplicate_image_column_is_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array([b"x"]), pa.array([b"y"])], names=["image", "image"])
    path = str(tmp_path / "dup.parquet")
    pq.write_table(table, path)
    [entry] = _list(path, caption_column="")
    assert entry.rejection == "no_image_column"
    assert "2 columns 'image'" in entry.detail


@pytest.mark.parametrize(
    ("columns", "seen"),
    [
        ({"image": [b"x"], "caption": ["a"]}, "no column 'text'; columns: ['image', 'caption']"),
        ({"image": [b"x"], "text": [3]}, "column 'text' has type int64, not a string"),
    ],
    ids=["missing", "int"],
)
def test_no_caption_column(tmp_path, columns, seen):
    path = _write(tmp_path / "nocaption.parquet", columns)
    [entry] = _list(path)
    assert (entry.locator, entry.rejection) == ("nocaption.parquet::file", "no_caption_column")
    assert seen in entry.detail
    assert _list(path, caption_column="")[0].rejection is None


def test_read_refusals_by_reason(tmp_path):
    big = _png(9, size=(64, 64))
    structs = [
        {"bytes": _png(1), "path": "kept.png"},
        {"bytes": None, "path": "/data/elsewhere/cat.jpg"},
        None,
        {"bytes": None, "path": None},
        {"bytes": b"", "path": "zero.png"},
        {"bytes": big, "path": None},
    ]
    columns = {"image": pa.array(structs, type=HF_IMAGE), "text": list("abcdef")}
    path = _write(tmp_path / "hf.parquet", columns, row_group_size=4)
    config = _config(path, max_image_bytes=len(big) - 1)
    assert all(entry.rejection is None for entry in list_parquet_file(path, config))
    results = read_images(path, [0, 1, 2, 3, 4, 5, 6, -1], config)
    assert _reasons(results) == [
        None,
        "no_image_bytes",
        "no_image_bytes",
        "no_image_bytes",
        "empty_file",
        "too_large",
        "row_out_of_range",
        "row_out_of_range",
    ]
    assert results[0][0] == structs[0]["bytes"]
    assert "stored by path only ('/data/elsewhere/cat.jpg')" in results[1][2]
    assert results[2][2] == "the image is null"
    assert results[3][2] == "the image bytes are null"
    assert results[5][2] == f"{len(big)} bytes > {len(big) - 1}"
    assert results[6][2] == "row 6; the file has 6 rows"
    plain = _write(tmp_path / "plain.parquet", {"image": pa.array([None, b""], pa.binary())})
    assert _reasons(_read(plain, [0, 1])) == ["no_image_bytes", "empty_file"]


def test_file_changed_since_listing(tmp_path):
    images = [_png(shade) for shade in range(6)]
    path = _hf_file(tmp_path / "shrinks.parquet", images, list("abcdef"))
    config = _config(path)
    assert len(list_parquet_file(path, config)) == 6
    _hf_file(tmp_path / "shrinks.parquet", images[:2], list("ab"))
    assert read_images(path, [1, 4], config) == [
        (images[1], None, ""),
        (None, "row_out_of_range", "row 4; the file has 2 rows"),
    ]
    _write(tmp_path / "shrinks.parquet", {"text": ["a"]})
    [(data, reason, detail)] = read_images(path, [0], config)
    assert (data, reason) == (None, "no_image_column")
    assert detail.startswith("since listing: no column 'image'")
    (tmp_path / "shrinks.parquet").write_bytes(b"garbage")
    assert _reasons(read_images(path, [0, 1], config)) == ["unreadable_file"] * 2
    os.unlink(path)
    assert read_images(path, [0], config)[0][:2] == (None, "unreadable_file")


def _zero_column_chunk(path, *, row_group, column):
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    with open(path, "r+b") as file:
        file.seek(start)
        file.write(b"\0" * chunk.total_compressed_size)


def test_corrupt_row_groups_refuse_only_their_rows(tmp_path):
    images = [_png(shade) for shade in range(9)]
    path = _hf_file(tmp_path / "corrupt.parquet", images, list("abcdefghi"))
    config = _config(path)
    schema = pq.ParquetFile(path).metadata.schema
    leaves = [schema.column(index).path for index in range(len(schema))]
    assert leaves == ["image.bytes", "image.path", "text"]
    for row_group in range(3):
        _zero_column_chunk(path, row_group=row_group, column=0)
    _zero_column_chunk(path, row_group=2, column=2)
    entries = list_parquet_file(path, config)
    # Every image chunk is garbage, yet the first two row groups list: their images were not read.
    assert [entry.caption for entry in entries[:6]] == list("abcdef")
    assert [entry.rejection for entry in entries] == [None] * 6 + ["unreadable_file"] * 3
    assert entries[6].detail.startswith("row group 2: captions unreadable")
    results = read_images(path, [0, 4, 8], config)
    assert _reasons(results) == ["unreadable_file"] * 3
    assert results[1][2].startswith("row group 1: ")


class _CountingFile(io.FileIO):
    """A local file that adds every byte read to a shared tally."""

    def __init__(self, path, tally):
        super().__init__(path, "r")
        self.tally = tally

    def read(self, size=-1):
        data = super().read(size)
        self.tally.append(len(data))
        return data


def test_listing_does_not_read_the_image_column(tmp_path, monkeypatch):
    images = [os.urandom(1 << 20) for _ in range(4)]
    columns = {"image": pa.array(images, pa.binary()), "text": list("abcd")}
    path = _write(tmp_path / "huge.parquet", columns, row_group_size=1, compression="none")
    assert os.path.getsize(path) > 4 << 20
    tally = []
    monkeypatch.setattr(
        parquet_image_source,
        "_open_input",
        lambda name: pa.PythonFile(_CountingFile(name, tally), mode="r"),
    )
    entries = _list(path)
    assert [entry.caption for entry in entries] == list("abcd")
    assert sum(tally) < 256 << 10
    tally.clear()
    assert _read(path, [2]) == [(images[2], None, "")]
    # One row group of one image: the other three images stay unread.
    assert (1 << 20) <= sum(tally) < (1 << 20) + (256 << 10)


def _tree(root):
    for relpath in (
        "b/z.parquet",
        "a.parquet",
        "b/a.parquet",
        "a-b/c.parquet",
        "UPPER.PARQUET",
        ".hidden.parquet",
        "_tmp.parquet",
        "_delta_log/x.parquet",
        ".cache/y.parquet",
        "b/.deep/q.parquet",
        "notes.txt",
        "a.parquet.crc",
    ):
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(b"x")
    return ["UPPER.PARQUET", "a-b/c.parquet", "a.parquet", "b/a.parquet", "b/z.parquet"]


def test_expand_folders_sorted_skipping_hidden_and_underscore_names(tmp_path):
    listed = _tree(tmp_path / "data")
    expected = [str(tmp_path / "data" / relpath) for relpath in listed]
    assert expand_parquet_paths([str(tmp_path / "data")]) == expected
    assert expand_parquet_paths((str(tmp_path / "data"), str(tmp_path / "data"))) == expected


def test_expand_files_and_de_duplication_in_order(tmp_path, monkeypatch):
    _tree(tmp_path)
    (tmp_path / "blob").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert expand_parquet_paths(["b/z.parquet", "./b", "blob", str(tmp_path / "b/z.parquet")]) == [
        str(tmp_path / "b/z.parquet"),
        str(tmp_path / "b/a.parquet"),
        str(tmp_path / "blob"),
    ]
    assert expand_parquet_paths(["_tmp.parquet"]) == [str(tmp_path / "_tmp.parquet")]


def test_expand_refusals_are_value_errors_naming_the_item(tmp_path):
    missing = str(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=f"^paths: '{missing}' does not exist"):
        expand_parquet_paths([missing])
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden" / ".x").mkdir(parents=True)
    (tmp_path / "hidden" / ".x" / "a.parquet").write_bytes(b"x")
    (tmp_path / "hidden" / "a.csv").write_bytes(b"x")
    for folder in ("empty", "hidden"):
        with pytest.raises(ValueError, match=f"^paths: folder '.*{folder}' holds no .parquet"):
            expand_parquet_paths([str(tmp_path / folder)])
    for bad in ([], "a.parquet", [""]):
        with pytest.raises(ValueError, match="^paths:"):
            expand_parquet_paths(bad)


def test_uri_paths_expand_list_and_read(tmp_path):
    image = _png(77)
    _hf_file(tmp_path / "set" / "part-1.parquet", [image], ["via uri"])
    _hf_file(tmp_path / "set" / "sub" / "part-0.parquet", [image], ["deeper"])
    (tmp_path / "set" / "_SUCCESS").write_bytes(b"")
    folder = f"file://{tmp_path}/set"
    paths = expand_parquet_paths([folder + "/"])
    assert paths == [f"{folder}/part-1.parquet", f"{folder}/sub/part-0.parquet"]
    assert expand_parquet_paths([paths[1]]) == [paths[1]]
    [entry] = _list(paths[0])
    assert (entry.locator, entry.caption) == ("part-1.parquet::0", "via uri")
    assert _read(paths[0], [0]) == [(image, None, "")]
    with pytest.raises(ValueError, match="^paths: .*nothing.* does not exist"):
        expand_parquet_paths([f"file://{tmp_path}/nothing"])
    [refused] = list_parquet_file(f"file://{tmp_path}/nothing", _config(tmp_path))
    assert refused.rejection == "unreadable_file"


def test_config_defaults():
    config = ParquetImageSourceConfig(paths=("/data",))
    assert (config.image_column, config.caption_column) == ("image", "text")
    assert config.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("paths", ()),
        ("paths", ["/data"]),
        ("paths", ("",)),
        ("paths", (" ",)),
        ("image_column", ""),
        ("caption_column", "  "),
        ("caption_column", "image"),
        ("max_image_bytes", 0),
        ("max_image_bytes", True),
        ("max_image_bytes", 1.5),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    fields = {"paths": ("/data",), field: value}
    with pytest.raises(ValueError, match=f"^{field}:"):
        ParquetImageSourceConfig(**fields)


def test_entry_invariants():
    assert set(PARQUET_IMAGE_REASONS) >= {"unreadable_file", "no_image_column", "too_large"}
    with pytest.raises(ValueError, match="^rejection"):
        ParquetImageEntry(path="p", locator="p::0", row_index=0, rejection="nope")
    for row_index in (None, -1):
        with pytest.raises(ValueError, match="^row_index"):
            ParquetImageEntry(path="p", locator="p::file", row_index=row_index)
    with pytest.raises(ValueError, match="^caption"):
        ParquetImageEntry(path="p", locator="p::0", row_index=0, caption="x")
    with pytest.raises(ValueError, match="^caption_from"):
        ParquetImageEntry(path="p", locator="p::0", row_index=0, caption_from="txt")
