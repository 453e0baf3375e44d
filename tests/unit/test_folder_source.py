"""folder_source on folders built in tmp_path: captions in every form, hostile trees, safe reads."""

import codecs
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data import folder_source
from components.data.folder_source import (
    FOLDER_REASONS,
    FolderEntry,
    FolderSourceConfig,
    decode_caption_text,
    list_folder,
    metadata_captions,
    read_image_bytes,
    unmatched_metadata,
)

pytestmark = pytest.mark.unit

MAX_BYTES = 1 << 20


def _png(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _by_relpath(root, **config):
    return {
        entry.relpath: entry for entry in list_folder(FolderSourceConfig(root=str(root), **config))
    }


def _caption(entry):
    return entry.caption, entry.caption_from


def test_txt_sidecar_caption_and_bytes(tmp_path):
    data = _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red square \n", encoding="utf-8")
    [entry] = list_folder(FolderSourceConfig(root=str(tmp_path)))
    assert (entry.relpath, entry.path, entry.rejection) == (
        "a.png",
        (tmp_path / "a.png").resolve(),
        None,
    )
    assert _caption(entry) == ("a red square", "txt")
    assert read_image_bytes(entry, max_bytes=MAX_BYTES) == (data, None, "")


def test_json_sidecar_uses_the_configured_key(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.json").write_text(json.dumps({"text": "from json", "caption": "other"}))
    entries = _by_relpath(tmp_path, caption_json_key="text")
    assert _caption(entries["a.png"]) == ("from json", "json")


def test_txt_beats_json_beats_metadata(tmp_path):
    for stem in ("all", "json_meta", "meta_only", "nothing"):
        _png(tmp_path / f"{stem}.png")
    (tmp_path / "all.txt").write_text("txt")
    (tmp_path / "all.json").write_text('{"caption": "json"}')
    (tmp_path / "json_meta.json").write_text('{"caption": "json"}')
    rows = [
        {"file_name": f"{stem}.png", "caption": "meta"}
        for stem in ("all", "json_meta", "meta_only")
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    entries = _by_relpath(tmp_path, metadata_file="metadata.jsonl")
    assert {relpath: _caption(entry) for relpath, entry in entries.items()} == {
        "all.png": ("txt", "txt"),
        "json_meta.png": ("json", "json"),
        "meta_only.png": ("meta", "metadata"),
        "nothing.png": (None, "none"),
    }


def test_metadata_jsonl_paths_are_relative_to_its_folder(tmp_path):
    _png(tmp_path / "set" / "img" / "a.png")
    _png(tmp_path / "set" / "b.png")
    lines = [
        {"file_name": "img/a.png", "caption": "caption a"},
        {"file_name": "./b.png", "caption": "caption b"},
        {"file_name": "b.png", "caption": "second row for b loses"},
        {"file_name": "gone.png", "caption": "deleted file"},
        {"file_name": "../../escape.png", "caption": "outside the root"},
        {"file_name": "img/a.png", "caption": None},
    ]
    (tmp_path / "set" / "metadata.jsonl").write_text(
        "\n".join(json.dumps(line) for line in lines) + "\n\n"
    )
    config = FolderSourceConfig(root=str(tmp_path), metadata_file="set/metadata.jsonl")
    captions = metadata_captions(config)
    assert captions == {
        "set/img/a.png": "caption a",
        "set/b.png": "caption b",
        "set/gone.png": "deleted file",
    }
    entries = list_folder(config)
    assert [_caption(entry) for entry in entries] == [
        ("caption b", "metadata"),
        ("caption a", "metadata"),
    ]
    assert unmatched_metadata(captions, entries) == ["set/gone.png"]


def test_metadata_csv(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "meta.csv").write_text(
        'file_name,text\na.png,"a caption, with a comma"\nb.png,"two\nlines"\n', encoding="utf-8"
    )
    entries = _by_relpath(tmp_path, metadata_file="meta.csv", caption_column="text")
    assert _caption(entries["a.png"]) == ("a caption, with a comma", "metadata")
    assert _caption(entries["b.png"]) == ("two\nlines", "metadata")


def test_metadata_parquet(tmp_path):
    _png(tmp_path / "sub" / "a.png")
    table = pa.table({"file_name": ["sub/a.png", "missing.png"], "caption": ["from parquet", "x"]})
    pq.write_table(table, tmp_path / "metadata.parquet")
    entries = _by_relpath(tmp_path, metadata_file="metadata.parquet")
    assert list(entries) == ["sub/a.png"]
    assert _caption(entries["sub/a.png"]) == ("from parquet", "metadata")


def test_metadata_problems_are_value_errors_naming_the_file(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="absent.jsonl.*does not exist"):
        list_folder(FolderSourceConfig(root=str(tmp_path), metadata_file="absent.jsonl"))
    (tmp_path / "meta.jsonl").write_text('{"file_name": "a.png", "text": "no caption column"}\n')
    with pytest.raises(ValueError, match=r"meta.jsonl.*line 1.*\['caption'\]"):
        list_folder(FolderSourceConfig(root=str(tmp_path), metadata_file="meta.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl.*line 1"):
        list_folder(FolderSourceConfig(root=str(tmp_path), metadata_file="bad.jsonl"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet"):
        list_folder(FolderSourceConfig(root=str(tmp_path), metadata_file="junk.parquet"))


@pytest.mark.parametrize(
    ("bom", "encoding"),
    [
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
        (b"", "latin-1"),
        (b"", "utf-8"),
    ],
    ids=["utf8_bom", "utf16_le_bom", "utf16_be_bom", "latin1", "utf8"],
)
def test_caption_encodings_decode(tmp_path, bom, encoding):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(bom + "caf\u00e9 au lait\r\n".encode(encoding))
    [entry] = list_folder(FolderSourceConfig(root=str(tmp_path)))
    assert _caption(entry) == ("caf\u00e9 au lait", "txt")


def test_decode_caption_text_never_fails():
    assert decode_caption_text(b"\xff\xfe\x00") == "\ufffd"
    assert decode_caption_text(bytes(range(256))) == bytes(range(256)).decode("latin-1")


def test_empty_and_broken_sidecars_give_no_caption_and_a_detail(tmp_path):
    for stem in ("empty", "blank", "badjson", "nokey", "fallthrough"):
        _png(tmp_path / f"{stem}.png")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t ")
    (tmp_path / "badjson.json").write_text("{not json")
    (tmp_path / "nokey.json").write_text('{"text": "wrong key"}')
    (tmp_path / "fallthrough.txt").write_text("")
    (tmp_path / "fallthrough.json").write_text('{"caption": "json caption"}')
    entries = _by_relpath(tmp_path)
    for relpath in ("empty.png", "blank.png", "badjson.png", "nokey.png"):
        assert _caption(entries[relpath]) == (None, "none")
        assert entries[relpath].rejection is None
    assert "empty caption file empty.txt" in entries["empty.png"].detail
    assert "empty caption file blank.txt" in entries["blank.png"].detail
    assert "invalid JSON in badjson.json" in entries["badjson.png"].detail
    assert "no string 'caption' key" in entries["nokey.png"].detail
    assert _caption(entries["fallthrough.png"]) == ("json caption", "json")
    assert "empty caption file fallthrough.txt" in entries["fallthrough.png"].detail


def test_oversized_caption_file_is_ignored(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"x" * ((1 << 20) + 1))
    [entry] = list_folder(FolderSourceConfig(root=str(tmp_path)))
    assert _caption(entry) == (None, "none")
    assert "a.txt too_large" in entry.detail


def test_hostile_folder_is_listed_without_raising(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    _png(outside / "secret.png")
    _png(root / "good.png")
    (root / "zero.png").write_bytes(b"")
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "caption_out.txt").symlink_to(outside / "secret.png")
    (root / "folder.jpg").mkdir()
    _png(root / "folder.jpg" / "inner.png")
    os.mkfifo(root / "pipe.png")
    entries = _by_relpath(root)
    assert {relpath: entry.rejection for relpath, entry in entries.items()} == {
        "caption_out.txt": "symlink_outside_root",
        "dangling.jpg": "broken_symlink",
        "folder.jpg": "not_a_file",
        "folder.jpg/inner.png": None,
        "good.png": None,
        "loop.png": "symlink_loop",
        "out.png": "symlink_outside_root",
        "outdir": "symlink_outside_root",
        "pipe.png": "not_a_file",
        "zero.png": None,
    }
    assert all(entry.path is None for entry in entries.values() if entry.rejection)
    assert set(entry.rejection for entry in entries.values()) - {None} <= set(FOLDER_REASONS)
    assert read_image_bytes(entries["zero.png"], max_bytes=MAX_BYTES)[1] == "empty_file"
    assert read_image_bytes(entries["out.png"], max_bytes=MAX_BYTES)[:2] == (
        None,
        "symlink_outside_root",
    )


def test_symlinks_inside_the_root(tmp_path):
    data = _png(tmp_path / "pool" / "a.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "pool" / "a.png")
    (tmp_path / "link.txt").symlink_to(tmp_path / "pool" / "caption.txt")
    (tmp_path / "pool" / "caption.txt").write_text("linked caption")
    (tmp_path / "mirror").symlink_to(tmp_path / "pool", target_is_directory=True)
    entries = _by_relpath(tmp_path)
    # The folder link is not descended: pool/a.png is listed once under its own path.
    assert list(entries) == ["link.png", "pool/a.png"]
    assert entries["link.png"].path == (tmp_path / "pool" / "a.png").resolve()
    assert _caption(entries["link.png"]) == ("linked caption", "txt")
    assert read_image_bytes(entries["link.png"], max_bytes=MAX_BYTES) == (data, None, "")


def test_undecodable_name_is_refused(tmp_path):
    _png(tmp_path / "ok.png")
    try:
        with open(os.path.join(os.fsencode(tmp_path), b"bad\xff.png"), "wb") as file:
            file.write(b"\x89PNG")
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 names")
    entries = _by_relpath(tmp_path)
    assert entries["bad\\xff.png"].rejection == "undecodable_name"
    assert entries["ok.png"].rejection is None


def test_read_refusals(tmp_path):
    _png(tmp_path / "big.png", size=(64, 64))
    _png(tmp_path / "swapped.png")
    _png(tmp_path / "sub" / "moved.png")
    _png(tmp_path / "deleted.png")
    _png(tmp_path / "other.png")
    entries = _by_relpath(tmp_path)
    assert read_image_bytes(entries["big.png"], max_bytes=10)[:2] == (None, "too_large")
    os.replace(tmp_path / "swapped.png", tmp_path / "elsewhere.png")
    (tmp_path / "swapped.png").symlink_to(tmp_path / "other.png")
    assert read_image_bytes(entries["swapped.png"], max_bytes=MAX_BYTES)[1] == (
        "changed_since_listing"
    )
    os.rename(tmp_path / "sub", tmp_path / "sub_real")
    (tmp_path / "sub").symlink_to(tmp_path / "sub_real", target_is_directory=True)
    assert read_image_bytes(entries["sub/moved.png"], max_bytes=MAX_BYTES)[1] == (
        "changed_since_listing"
    )
    (tmp_path / "deleted.png").unlink()
    assert read_image_bytes(entries["deleted.png"], max_bytes=MAX_BYTES)[1] == "unreadable"
    with pytest.raises(ValueError, match="max_bytes"):
        read_image_bytes(entries["other.png"], max_bytes=0)


def test_unreadable_file(tmp_path, monkeypatch):
    _png(tmp_path / "locked.png")
    [entry] = list_folder(FolderSourceConfig(root=str(tmp_path)))
    real_open = os.open

    def refusing_open(path, flags, *args):
        if os.fspath(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(folder_source.os, "open", refusing_open)
    data, reason, detail = read_image_bytes(entry, max_bytes=MAX_BYTES)
    assert (data, reason) == (None, "unreadable")
    assert "PermissionError" in detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_by_mode(tmp_path):
    _png(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    [entry] = list_folder(FolderSourceConfig(root=str(tmp_path)))
    assert read_image_bytes(entry, max_bytes=MAX_BYTES)[1] == "unreadable"


def test_unlistable_subfolder_is_one_refused_entry(tmp_path, monkeypatch):
    _png(tmp_path / "ok.png")
    _png(tmp_path / "locked" / "hidden_from_us.png")
    real_scandir = os.scandir

    def refusing_scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(folder_source.os, "scandir", refusing_scandir)
    entries = _by_relpath(tmp_path)
    assert {relpath: entry.rejection for relpath, entry in entries.items()} == {
        "locked": "unreadable",
        "ok.png": None,
    }


def test_order_is_sorted_by_relpath_and_repeatable(tmp_path):
    names = ["b/z.png", "a.png", "B.PNG", "b/a.jpg", "a/b/c.webp", "a-b.jpeg", "c.gif"]
    for name in reversed(names):
        _png(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    first = [entry.relpath for entry in list_folder(FolderSourceConfig(root=str(tmp_path)))]
    assert first == sorted(names)
    assert first == [entry.relpath for entry in list_folder(FolderSourceConfig(root=str(tmp_path)))]


def test_extensions_match_case_insensitively_with_sidecars(tmp_path):
    _png(tmp_path / "IMG_1.JPG")
    (tmp_path / "IMG_1.TXT").write_text("upper-case names")
    entries = _by_relpath(tmp_path, image_extensions=(".jpg",))
    assert _caption(entries["IMG_1.JPG"]) == ("upper-case names", "txt")


def test_hidden_names_are_skipped(tmp_path):
    _png(tmp_path / "visible.png")
    _png(tmp_path / ".hidden.png")
    _png(tmp_path / ".git" / "inside.png")
    (tmp_path / ".escape.png").symlink_to("/etc/passwd")
    (tmp_path / ".visible.txt").write_text("hidden sidecars are ignored too")
    entries = _by_relpath(tmp_path)
    assert list(entries) == ["visible.png"]
    assert _caption(entries["visible.png"]) == (None, "none")


def test_bad_roots_are_value_errors_naming_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"root.*{missing}.*does not exist"):
        list_folder(FolderSourceConfig(root=str(missing)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="root.*file.*not a directory"):
        list_folder(FolderSourceConfig(root=str(tmp_path / "file")))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("root", ""),
        ("image_extensions", ()),
        ("image_extensions", (".JPG",)),
        ("image_extensions", ("jpg",)),
        ("image_extensions", (".txt",)),
        ("caption_json_key", ""),
        ("caption_column", "file_name"),
        ("metadata_file", "/abs/metadata.jsonl"),
        ("metadata_file", "../metadata.jsonl"),
        ("metadata_file", "metadata.txt"),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    kwargs = {"root": "/data", field: value}
    with pytest.raises(ValueError, match=f"^{field}:"):
        FolderSourceConfig(**kwargs)


def test_entry_invariants():
    with pytest.raises(ValueError, match="rejection"):
        FolderEntry(relpath="a", path=None, rejection="nope")
    with pytest.raises(ValueError, match="path"):
        FolderEntry(relpath="a", path=None)
    with pytest.raises(ValueError, match="caption"):
        FolderEntry(relpath="a", path=None, caption="x", rejection="not_a_file")
