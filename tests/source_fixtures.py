"""Local-source inputs the tests build: WebDataset shards in img2dataset's layout (one cut
short, a caption without its image) and Parquet files in Hugging Face's image struct (a row
without bytes, a corrupt file). Each writer returns {locator: expected reason}."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.demo_corpus import write_synthetic_corpus


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_shards(folder: Path, images: Path) -> dict[str, str]:
    """Two shards in img2dataset's layout (NNNNN.tar + .parquet + _stats.json beside it); the
    second is cut short. {locator: expected reason} of the complete samples."""
    items = write_synthetic_corpus(images, count=12, seed=5, max_side_px=160)
    folder.mkdir()
    expected = {}
    for shard, part in enumerate((items[:6], items[6:])):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for number, item in enumerate(part):
                key = f"{shard:05d}{number:04d}"
                suffix = Path(item.relpath).suffix.lstrip(".")
                tar_add(tar, f"{key}.{suffix}", (images / item.relpath).read_bytes())
                tar_add(tar, f"{key}.txt", item.caption.encode())
                meta = {"key": key, "caption": item.caption, "status": "success"}
                tar_add(tar, f"{key}.json", json.dumps(meta).encode())
                expected[f"{path.name}::{key}"] = item.expected_reason
            tar_add(tar, f"{shard:05d}9999.txt", b"a caption without its image")
            expected[f"{path.name}::{shard:05d}9999"] = "no_image"
        pq.write_table(pa.table({"key": [f"{shard:05d}"]}), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": len(part)}))
    # Cut the second shard inside its fourth sample: what came before is read, the rest is one
    # truncated_tar row.
    cut = folder / "00001.tar"
    with tarfile.open(cut) as tar:
        offset = [member for member in tar.getmembers()][9].offset_data
    cut.write_bytes(cut.read_bytes()[: offset + 10])
    for number in range(3, 6):
        del expected[f"00001.tar::00001{number:04d}"]
    del expected["00001.tar::000019999"]
    return expected


def write_parquet_images(folder: Path, images: Path) -> dict[str, str]:
    """A file in Hugging Face's image struct with a row whose bytes are missing, and a corrupt
    file. {locator: expected reason}."""
    items = write_synthetic_corpus(images, count=8, seed=9, max_side_px=160)
    folder.mkdir()
    structs = [
        {"bytes": (images / item.relpath).read_bytes(), "path": item.relpath} for item in items
    ]
    structs[2] = {"bytes": None, "path": "stored/elsewhere.jpg"}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(structs, type=image_type),
            "text": [item.caption for item in items],
        }
    )
    pq.write_table(table, folder / "train-00000.parquet", row_group_size=3)
    (folder / "train-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    expected = {
        f"train-00000.parquet::{row}": item.expected_reason for row, item in enumerate(items)
    }
    expected["train-00000.parquet::2"] = "no_image_bytes"
    expected["train-00001.parquet::file"] = "unreadable_file"
    return expected
