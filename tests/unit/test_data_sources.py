"""How a dataset grows from its url lists: stable keys, new rows only in new chunks, versions,
and the refusals (a list or row that disappears, unreadable lists, ambiguous names)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sources_override

from components.data import shard_format
from pipelines.config import load_config
from pipelines.data_layout import DataLayout
from pipelines.data_sources import (
    SourceListError,
    discover_lists,
    discover_url_lists,
    register_sources,
)

pytestmark = pytest.mark.unit


def _write_list(path, urls, captions=None):
    captions = captions or [f"caption {url}" for url in urls]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        lines = [json.dumps({"url": u, "caption": c}) for u, c in zip(urls, captions, strict=True)]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return path


def _data_config(root, *sources, chunk_size=2):
    overrides = [f"run.root={root}", sources_override(*sources)]
    return load_config("tiny", [*overrides, f"data.resources.chunk_size={chunk_size}"]).data


def _register(root, entries, chunk_size=2):
    source = {"name": "web", "kind": "url_list", "paths": [str(e) for e in entries]}
    config = _data_config(root, source, chunk_size=chunk_size)
    return register_sources(DataLayout(root), discover_lists(config), config=config)


def _publish(root, version):
    shard_format.write_manifest(DataLayout(root).data, {"version": version, "shards": []})


def test_one_list_gets_row_number_keys_chunks_in_order_and_repeated_urls_marked(tmp_path):
    urls = _write_list(tmp_path / "lists" / "a.parquet", ["a", "b", "a", "c", "b"])
    registry = _register(tmp_path / "run", [urls])
    assert registry.version == 1
    chunks = registry.chunks()
    assert [[row["sample_key"] for row in chunk] for chunk in chunks] == [
        ["000000000", "000000001"],
        ["000000002", "000000003"],
        ["000000004"],
    ]
    flags = [row["duplicate_url"] for chunk in chunks for row in chunk]
    assert flags == [False, False, True, False, True]


def test_a_new_list_adds_only_its_rows_in_new_chunks_as_the_next_version(tmp_path):
    lists = tmp_path / "lists"
    _write_list(lists / "a.parquet", ["a1", "a2", "a3"])
    first = _register(tmp_path / "run", [lists])
    _publish(tmp_path / "run", 1)
    again = _register(tmp_path / "run", [lists])
    assert again.version == 1 and again.rows == first.rows  # nothing new: the same version

    _write_list(lists / "b.jsonl", ["b1", "a1", "b2"])
    grown = _register(tmp_path / "run", [lists])
    assert grown.version == 2
    assert grown.rows[:3] == first.rows
    new = grown.rows[3:]
    assert [row["sample_key"] for row in new] == ["000000003", "000000004", "000000005"]
    assert [row["source_list"] for row in new] == ["b.jsonl"] * 3
    assert [row["chunk_index"] for row in new] == [2, 2, 3]  # chunks never span two lists
    assert {row["added_in"] for row in new} == {2}
    # A url another list already had is a duplicate of the first one.
    assert [row["duplicate_url"] for row in grown.chunks()[2]] == [False, True]
    summaries = {item["name"]: item for item in grown.list_summaries("web")}
    assert summaries["a.parquet"]["added_in"] == 1 and summaries["b.jsonl"]["rows"] == 3


def test_rows_appended_to_a_known_list_are_new_and_reordering_adds_nothing(tmp_path):
    path = _write_list(tmp_path / "a.parquet", ["x", "y"])
    _register(tmp_path / "run", [path])
    _publish(tmp_path / "run", 1)
    _write_list(path, ["y", "x"])
    assert _register(tmp_path / "run", [path]).version == 1
    _write_list(path, ["y", "x", "z", "x"], ["caption y", "caption x", "caption z", "caption x"])
    grown = _register(tmp_path / "run", [path])
    assert [(row["url"], row["occurrence"]) for row in grown.rows[2:]] == [("z", 0), ("x", 1)]


def test_an_unpublished_version_is_finished_by_the_rerun(tmp_path):
    path = _write_list(tmp_path / "a.parquet", ["x", "y"])
    _register(tmp_path / "run", [path])
    _publish(tmp_path / "run", 1)
    _write_list(tmp_path / "b.parquet", ["z"])
    assert _register(tmp_path / "run", [path, tmp_path / "b.parquet"]).version == 2
    # Killed before version 2 was published: the rerun finishes version 2, adding nothing.
    rerun = _register(tmp_path / "run", [path, tmp_path / "b.parquet"])
    assert rerun.version == 2 and len(rerun.rows) == 3


def test_a_dataset_only_grows(tmp_path):
    lists = tmp_path / "lists"
    _write_list(lists / "a.parquet", ["x", "y"])
    _write_list(lists / "b.parquet", ["z"])
    _register(tmp_path / "run", [lists])
    (lists / "b.parquet").unlink()
    with pytest.raises(SourceListError, match="list 'b.parquet' of 'web' is part of this dataset"):
        _register(tmp_path / "run", [lists])
    _write_list(lists / "b.parquet", ["z"])
    _write_list(lists / "a.parquet", ["x"])
    with pytest.raises(SourceListError, match="1 rows registered from this list.*, y\\)"):
        _register(tmp_path / "run", [lists])


def test_url_lists_are_found_and_checked(tmp_path):
    folder = tmp_path / "lists"
    _write_list(folder / "b.parquet", ["b"])
    _write_list(folder / "nested" / "a.jsonl", ["a"])
    _write_list(folder / ".partial" / "c.parquet", ["c"])
    (folder / ".d.parquet.tmp").write_text("in flight")
    (folder / "notes.txt").write_text("not a list")
    found = discover_url_lists([str(folder)])
    assert [name for name, _ in found] == ["b.parquet", "nested/a.jsonl"]

    with pytest.raises(SourceListError, match="url list not found"):
        discover_url_lists([str(tmp_path / "missing.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceListError, match="holds no url list"):
        discover_url_lists([str(tmp_path / "empty")])
    other = _write_list(tmp_path / "other" / "b.parquet", ["b2"])
    with pytest.raises(SourceListError, match="both named 'b.parquet'"):
        discover_url_lists([str(folder), str(other)])


def test_unreadable_lists_are_errors_naming_the_file(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(SourceListError, match="broken.parquet: unreadable url list"):
        _register(tmp_path / "run", [broken])
    no_url = tmp_path / "no_url.parquet"
    pq.write_table(pa.table({"link": ["x"]}), no_url)
    with pytest.raises(SourceListError, match="needs a 'url' column"):
        _register(tmp_path / "run2", [no_url])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"url": "x"}\n{not json\n')
    with pytest.raises(SourceListError, match="bad.jsonl: unreadable"):
        _register(tmp_path / "run3", [bad_json])
