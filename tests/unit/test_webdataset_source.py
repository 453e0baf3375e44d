"""webdataset_source on tar shards built in tmp_path: img2dataset layout, hostile tars, reads."""

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from components.data.webdataset_source import (
    CAPTION_SOURCES,
    WEBDATASET_REASONS,
    WebDatasetEntry,
    WebDatasetSourceConfig,
    expand_shard_paths,
    list_shard,
    list_shard_file,
    read_images,
)

pytestmark = pytest.mark.unit

CONFIG = WebDatasetSourceConfig(paths=("unused",))


def _image(fmt="PNG", color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format=fmt)
    return buffer.getvalue()


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name, kind, linkname="target.jpg"):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def _write_tar(path, members, **options):
    with tarfile.open(path, "w", **options) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


def _img2dataset_folder(folder, shards):
    """img2dataset's webdataset output: NNNNN.tar (jpg, txt, json per sample), parquet, stats."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for shard_index, captions in enumerate(shards):
        members = []
        for sample_index, caption in enumerate(captions):
            key = f"{shard_index:05d}{sample_index:04d}"
            images[key] = _image("JPEG", color=(sample_index * 40, shard_index * 90, 10))
            meta = {"url": f"http://127.0.0.1/{key}.jpg", "caption": caption, "key": key}
            meta |= {"status": "success", "width": 8, "height": 6}
            members += [
                _file(f"{key}.jpg", images[key]),
                _file(f"{key}.txt", (caption or "").encode()),
                _file(f"{key}.json", json.dumps(meta).encode()),
            ]
        _write_tar(folder / f"{shard_index:05d}.tar", members)
        (folder / f"{shard_index:05d}.parquet").write_bytes(b"PAR1 not read")
        (folder / f"{shard_index:05d}_stats.json").write_text('{"count": 2}')
    return images


def _by_key(entries):
    return {entry.key: entry for entry in entries}


def _reasons(entries):
    return [(entry.key, entry.rejection) for entry in entries]


def test_img2dataset_folder_lists_and_reads_back(tmp_path):
    images = _img2dataset_folder(tmp_path / "out", [["a red square", "a blue one"], ["third"]])
    shards = expand_shard_paths([str(tmp_path / "out")])
    assert shards == [str(tmp_path / "out" / "00000.tar"), str(tmp_path / "out" / "00001.tar")]
    entries = list_shard(shards[0], CONFIG)
    assert [(e.key, e.locator, e.member, e.caption, e.caption_from) for e in entries] == [
        ("000000000", "00000.tar::000000000", "000000000.jpg", "a red square", "txt"),
        ("000000001", "00000.tar::000000001", "000000001.jpg", "a blue one", "txt"),
    ]
    assert all(entry.rejection is None and entry.detail == "" for entry in entries)
    assert read_images(shards[0], entries) == [
        (images["000000000"], None, ""),
        (images["000000001"], None, ""),
    ]
    [third] = list_shard(shards[1], CONFIG)
    assert read_images(shards[1], [third]) == [(images["000010000"], None, "")]
    assert third.size == len(images["000010000"])


def test_caption_order_json_fallback_and_notes(tmp_path):
    png = _image()
    sidecars = {
        "a": [("txt", b"  from txt \n"), ("json", b'{"caption": "j"}')],
        "b": [("txt", b" \n"), ("json", b'{"caption": " j "}')],
        "c": [("json", b'{"caption": null, "url": "x"}')],
        "d": [("json", b"{not json")],
        "e": [("caption", "caf\u00e9".encode("latin-1"))],
        "f": [("json", b'{"text": "other key"}')],
    }
    members = []
    for key, texts in sidecars.items():
        members += [_file(f"{key}.jpg", png), *(_file(f"{key}.{ext}", data) for ext, data in texts)]
    shard = _write_tar(tmp_path / "s.tar", members)
    entries = _by_key(list_shard(str(shard), CONFIG))
    assert {key: (e.caption, e.caption_from) for key, e in entries.items()} == {
        "a": ("from txt", "txt"),
        "b": ("j", "json"),
        "c": (None, "none"),
        "d": (None, "none"),
        "e": (None, "none"),
        "f": (None, "none"),
    }
    assert "empty caption member .txt" in entries["b"].detail
    assert "invalid JSON" in entries["d"].detail
    assert "no non-empty string 'caption'" in entries["c"].detail
    config = WebDatasetSourceConfig(paths=("x",), caption_extensions=("caption", "txt"))
    entries = _by_key(list_shard(str(shard), config))
    assert (entries["e"].caption, entries["e"].caption_from) == ("caf\u00e9", "txt")
    keyed = WebDatasetSourceConfig(paths=("x",), caption_json_key="text")
    assert _by_key(list_shard(str(shard), keyed))["f"].caption == "other key"
    assert {e.caption_from for e in entries.values()} <= set(CAPTION_SOURCES)


def test_keys_extensions_and_image_choice(tmp_path):
    png, jpeg = _image("PNG"), _image("JPEG")
    members = [
        _file("dir/00000001.png", png),
        _file("dir/00000001.jpg", jpeg),
        _file("dir/00000001.txt", b"two images"),
        _file("UPPER.JPG", jpeg),
        _file("a.b.jpg", jpeg),
        _file("webp.webp", png),
    ]
    shard = str(_write_tar(tmp_path / "keys.tar", members))
    entries = list_shard(shard, CONFIG)
    assert [(e.key, e.member, e.rejection) for e in entries] == [
        ("dir/00000001", "dir/00000001.jpg", None),
        ("UPPER", "UPPER.JPG", None),
        ("a", "", "no_image"),
        ("webp", "webp.webp", None),
    ]
    assert entries[0].locator == "keys.tar::dir/00000001"
    assert "b.jpg" in entries[2].detail
    png_first = WebDatasetSourceConfig(paths=("x",), image_extensions=("png", "jpg"))
    first = list_shard(shard, png_first)[0]
    assert first.member == "dir/00000001.png"
    assert read_images(shard, [first]) == [(png, None, "")]


def test_hostile_members_are_refused_by_reason(tmp_path):
    png = _image()
    members = [
        _file("good.jpg", png),
        _file("labels.txt", b"no image here"),
        _file("labels.cls", b"3"),
        _file("dup.jpg", png),
        _file("other.jpg", png),
        _file("dup.txt", b"same key again, not adjacent"),
        _special("sub", tarfile.DIRTYPE),
        _special("link.jpg", tarfile.SYMTYPE),
        _special("hard.png", tarfile.LNKTYPE),
        _special("linkcap.txt", tarfile.SYMTYPE),
        _file("linkcap.jpg", png),
        _file("._good.jpg", b"AppleDouble"),
        _file("empty.jpg", b""),
        _file("big.png", png + b"\0"),
        _special("fifo.jpg", tarfile.FIFOTYPE),
        _file("README", b"no extension at all"),
    ]
    shard = str(_write_tar(tmp_path / "hostile.tar", members))
    config = WebDatasetSourceConfig(paths=("x",), max_image_bytes=len(png))
    entries = list_shard(shard, config)
    assert _reasons(entries) == [
        ("good", None),
        ("labels", "no_image"),
        ("dup", None),
        ("other", None),
        ("dup", "duplicate_key"),
        ("link", "not_a_file"),
        ("hard", "not_a_file"),
        ("linkcap", None),
        ("empty", "empty_file"),
        ("big", "too_large"),
        ("fifo", "not_a_file"),
        ("README", "no_image"),
    ]
    assert {entry.rejection for entry in entries} - {None} <= set(WEBDATASET_REASONS)
    assert "['txt', 'cls']" in entries[1].detail
    results = read_images(shard, entries)
    assert [result[1] for result in results] == [entry.rejection for entry in entries]
    assert results[0] == (png, None, "")
    assert results[4][2] == entries[4].detail


def test_repeated_member_keeps_the_first(tmp_path):
    first, second = _image(color=(1, 2, 3)), _image(color=(4, 5, 6))
    shard = str(_write_tar(tmp_path / "r.tar", [_file("k.png", first), _file("k.png", second)]))
    [entry] = list_shard(shard, CONFIG)
    assert "repeated member 'k.png' ignored" in entry.detail
    assert read_images(shard, [entry]) == [(first, None, "")]


def _three_samples(path):
    members = []
    for key in ("s0", "s1", "s2"):
        members += [_file(f"{key}.jpg", _image() + bytes(700)), _file(f"{key}.txt", key.encode())]
    _write_tar(path, members)
    with tarfile.open(path) as tar:
        return {info.name: info for info in tar.getmembers()}


@pytest.mark.parametrize(
    "cut",
    ["inside_image_data", "inside_header", "inside_padding", "no_end_blocks", "garbage_header"],
)
def test_truncated_or_corrupt_tar_keeps_complete_samples(tmp_path, cut):
    path = tmp_path / "cut.tar"
    infos = _three_samples(path)
    last_jpg, last_txt = infos["s2.jpg"], infos["s2.txt"]
    data = path.read_bytes()
    if cut == "inside_image_data":
        data = data[: last_jpg.offset_data + 100]
    elif cut == "inside_header":
        data = data[: last_jpg.offset + 200]
    elif cut == "inside_padding":
        data = data[: last_txt.offset_data + last_txt.size]
    elif cut == "no_end_blocks":
        data = data[: last_txt.offset_data + 512]
    else:
        data = data[: last_txt.offset] + b"\x7f" * 512 + data[last_txt.offset + 512 :]
    path.write_bytes(data)
    entries = list_shard(str(path), CONFIG)
    # An unreadable header hides whether s1 had more members, so s1 is the sample dropped there.
    dropped = "s1" if cut == "inside_header" else "s2"
    kept = [("s0", None)] if dropped == "s1" else [("s0", None), ("s1", None)]
    assert _reasons(entries) == [*kept, ("", "truncated_tar")]
    assert entries[-1].locator == "cut.tar::"
    assert "byte" in entries[-1].detail
    assert f"sample {dropped!r} being read there is dropped" in entries[-1].detail
    results = read_images(str(path), entries)
    assert [result[1] for result in results] == [None] * len(kept) + ["truncated_tar"]


@pytest.mark.parametrize(
    "content", [b"", b"not a tar at all" * 100, b"\x1f\x8b\x08" + bytes(2000)], ids=str
)
def test_files_that_are_not_tars_are_one_truncated_entry(tmp_path, content):
    (tmp_path / "bad.tar").write_bytes(content)
    [entry] = list_shard(str(tmp_path / "bad.tar"), CONFIG)
    assert (entry.key, entry.rejection) == ("", "truncated_tar")


def test_unreadable_shard_is_one_refused_entry(tmp_path):
    for path in (tmp_path / "missing.tar", tmp_path):
        [entry] = list_shard(str(path), CONFIG)
        assert (entry.key, entry.rejection) == ("", "unreadable")
    os.mkfifo(tmp_path / "pipe.tar")
    [entry] = list_shard(str(tmp_path / "pipe.tar"), CONFIG)
    assert entry.rejection == "unreadable"
    assert "not a regular file" in entry.detail


def test_hostile_sizes_and_names_never_raise(tmp_path):
    png = _image()
    path = _write_tar(tmp_path / "h.tar", [_file("a.jpg", png), _file("b.jpg", png)])
    data = bytearray(path.read_bytes())
    # A pax size record saying -512 would make tarfile read the same header forever.
    with tarfile.open(path) as tar:
        second = tar.getmember("b.jpg")
    header = tarfile.TarInfo("b.jpg")
    header.size = len(png)
    header.pax_headers = {"size": "-512"}
    pax = header.tobuf(tarfile.PAX_FORMAT)
    (tmp_path / "neg.tar").write_bytes(bytes(data[: second.offset]) + pax + bytes(4096))
    assert _reasons(list_shard(str(tmp_path / "neg.tar"), CONFIG)) == [
        ("a", None),
        ("", "truncated_tar"),
    ]
    # GNU format stores the name's bytes as given (PAX would re-encode them as UTF-8).
    latin_options = {"format": tarfile.GNU_FORMAT, "encoding": "latin-1"}
    latin = _write_tar(tmp_path / "latin.tar", [_file("caf\xe9.jpg", png)], **latin_options)
    latin_entries = list_shard(str(latin), CONFIG)
    assert _reasons(latin_entries) == [("caf\\xe9", None)]
    latin_entries[0].key.encode("utf-8")


def test_long_names_in_pax_and_gnu_formats_read_back(tmp_path):
    png = _image()
    name = "deep/" + "d" * 150 + "/00000001.png"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        shard = str(_write_tar(tmp_path / f"{fmt}.tar", [_file(name, png)], format=fmt))
        [entry] = list_shard(shard, CONFIG)
        assert entry.key == name[: -len(".png")]
        assert read_images(shard, [entry]) == [(png, None, "")]


class _CountingFile(io.RawIOBase):
    def __init__(self, path):
        self.file, self.bytes_read = open(path, "rb", buffering=0), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, count=-1):
        data = self.file.read(count)
        self.bytes_read += len(data)
        return data

    def seek(self, offset, whence=os.SEEK_SET):
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def close(self):
        self.file.close()
        super().close()


def test_listing_reads_headers_and_captions_not_image_bytes(tmp_path):
    big = os.urandom(4 << 20)
    members = [_file("a.jpg", big), _file("a.txt", b"caption a"), _file("b.png", big)]
    path = _write_tar(tmp_path / "big.tar", members)
    counting = _CountingFile(path)
    with counting:
        entries = list_shard_file(counting, shard_name="big.tar", config=CONFIG)
    assert _reasons(entries) == [("a", None), ("b", None)]
    assert entries[0].caption == "caption a"
    assert counting.bytes_read < 16 * 1024
    assert read_images(str(path), entries[1:]) == [(big, None, "")]


def test_shard_changed_after_listing(tmp_path):
    path = tmp_path / "s.tar"
    infos = _three_samples(path)
    entries = list_shard(str(path), CONFIG)
    original = path.read_bytes()
    path.write_bytes(original[: infos["s1.jpg"].offset_data + 10])
    assert [result[1] for result in read_images(str(path), entries)] == [
        None,
        "truncated_tar",
        "truncated_tar",
    ]
    header_at = infos["s2.jpg"].offset
    path.write_bytes(original[:header_at] + bytes(512) + original[header_at + 512 :])
    assert [result[1] for result in read_images(str(path), entries)] == [
        None,
        None,
        "changed_since_listing",
    ]
    path.unlink()
    refused = WebDatasetEntry(key="x", locator="s.tar::x", rejection="no_image", detail="why")
    results = read_images(str(path), [*entries[:1], refused])
    assert results[0][:2] == (None, "unreadable")
    assert results[1] == (None, "no_image", "why")


def test_read_images_refuses_entries_of_another_shard(tmp_path):
    path = tmp_path / "s.tar"
    _three_samples(path)
    entries = list_shard(str(path), CONFIG)
    with pytest.raises(ValueError, match="entries: 's.tar::s0' is not an entry of other.tar"):
        read_images(str(tmp_path / "other.tar"), entries)


def test_file_uri_goes_through_pyarrow(tmp_path):
    path = tmp_path / "s.tar"
    _three_samples(path)
    uri = path.as_uri()
    assert expand_shard_paths([uri]) == [uri]
    entries = list_shard(uri, CONFIG)
    assert entries == list_shard(str(path), CONFIG)
    assert read_images(uri, entries) == read_images(str(path), entries)
    [missing] = list_shard(uri + ".gone", CONFIG)
    assert missing.rejection == "unreadable"


def test_brace_patterns_expand_in_order(tmp_path):
    for index in range(12):
        _write_tar(tmp_path / f"{index:05d}.tar", [])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        for index in (0, 1):
            _write_tar(tmp_path / folder / f"{index}.tar", [])
    root = str(tmp_path)
    assert expand_shard_paths([f"{root}/{{00000..00002}}.tar"]) == [
        f"{root}/00000.tar",
        f"{root}/00001.tar",
        f"{root}/00002.tar",
    ]
    assert expand_shard_paths([f"{root}/{{00009..00099}}.tar"]) == [
        f"{root}/{index:05d}.tar" for index in (9, 10, 11)
    ]
    assert expand_shard_paths([f"{root}/{{b,a}}/{{0..1}}.tar"]) == [
        f"{root}/b/0.tar",
        f"{root}/b/1.tar",
        f"{root}/a/0.tar",
        f"{root}/a/1.tar",
    ]
    assert expand_shard_paths(
        [f"{root}/00003.tar", f"{root}/{{00003,00004}}.tar", f"{root}/./00004.tar"]
    ) == [f"{root}/00003.tar", f"{root}/00004.tar"]
    with pytest.raises(ValueError, match=r"paths: .*\{00100\.\.00199\}.* matches no existing"):
        expand_shard_paths([f"{root}/{{00100..00199}}.tar"])
    with pytest.raises(ValueError, match="backwards"):
        expand_shard_paths([f"{root}/{{9..1}}.tar"])
    with pytest.raises(ValueError, match="neither a range"):
        expand_shard_paths([f"{root}/{{00001}}.tar"])


def test_folders_expand_recursively_sorted_skipping_hidden(tmp_path):
    _img2dataset_folder(tmp_path / "set" / "part2", [["x"]])
    _img2dataset_folder(tmp_path / "set" / "part1", [["y"], ["z"]])
    _write_tar(tmp_path / "set" / ".hidden.tar", [])
    (tmp_path / "set" / ".cache").mkdir()
    _write_tar(tmp_path / "set" / ".cache" / "0.tar", [])
    (tmp_path / "set" / "notes.txt").write_text("not a shard")
    root = str(tmp_path / "set")
    assert expand_shard_paths([root]) == [
        f"{root}/part1/00000.tar",
        f"{root}/part1/00001.tar",
        f"{root}/part2/00000.tar",
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="paths: folder .*empty.* holds no .tar"):
        expand_shard_paths([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="paths: .*missing.tar.* does not exist"):
        expand_shard_paths([str(tmp_path / "missing.tar")])


def test_a_literal_name_with_braces_is_taken_as_is(tmp_path):
    _write_tar(tmp_path / "{1..2}.tar", [])
    assert expand_shard_paths([str(tmp_path / "{1..2}.tar")]) == [str(tmp_path / "{1..2}.tar")]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("paths", ()),
        ("paths", ("",)),
        ("paths", ["a.tar"]),
        ("image_extensions", ()),
        ("image_extensions", (".jpg",)),
        ("image_extensions", ("JPG",)),
        ("image_extensions", ("txt",)),
        ("image_extensions", ("json",)),
        ("caption_extensions", ("json",)),
        ("caption_extensions", (".txt",)),
        ("caption_json_key", ""),
        ("max_image_bytes", 0),
        ("max_image_bytes", True),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    kwargs = {"paths": ("a.tar",), field: value}
    with pytest.raises(ValueError, match=f"^{field}:"):
        WebDatasetSourceConfig(**kwargs)


def test_config_accepts_no_caption_extensions_and_multi_part_ones():
    config = WebDatasetSourceConfig(
        paths=("a.tar",), caption_extensions=(), image_extensions=("seg.png", "jpg")
    )
    assert config.caption_extensions == ()


def test_entry_invariants():
    with pytest.raises(ValueError, match="rejection"):
        WebDatasetEntry(key="a", locator="s.tar::a", rejection="nope")
    with pytest.raises(ValueError, match="member"):
        WebDatasetEntry(key="a", locator="s.tar::a")
    with pytest.raises(ValueError, match="caption"):
        WebDatasetEntry(key="a", locator="s.tar::a", caption="x", rejection="no_image")
    with pytest.raises(ValueError, match="caption_from"):
        WebDatasetEntry(key="a", locator="s.tar::a", caption_from="meta", rejection="no_image")
