"""Captions for uncaptioned images (data.captioning) on the tiny Qwen2-VL: kept rows without a
caption are captioned in the encoder actors and recorded as generated (by which model); given
captions stay given; captions over the token cap are cut and counted; a rerun captions nothing
again."""

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import sources_override
from transformers import AutoTokenizer

from components.data import shard_format
from pipelines.config import ConfigError
from pipelines.data import run_data
from pipelines.data_layout import DataLayout

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAP_TOKENS = 12


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_models_dir, ray_local, make_tiny_config):
    config = make_tiny_config(
        tmp_path_factory.mktemp("captioned"),
        tiny_models_dir,
        sources_override(
            {"name": "photos", "kind": "folder", "paths": [tiny_models_dir.photos]},
        ),
        "data.captioning.enabled=true",
        "data.captioning.max_new_tokens=8",
        f"data.encode.max_caption_tokens={CAP_TOKENS}",
        f"infer.requests.max_prompt_tokens={CAP_TOKENS}",
    )
    summary = run_data(config, show_progress=False)
    return config, summary


def _shard_rows(config) -> dict[str, dict]:
    root = Path(config.run.root) / "data"
    rows = {}
    for path in shard_format.list_shards(root):
        columns = ["url", "caption", "caption_origin", "caption_model", "caption_truncated"]
        for row in pq.read_table(path, columns=columns).to_pylist():
            rows[row["url"]] = row
    return rows


def _kept_without_caption(config) -> list[str]:
    layout = DataLayout(Path(config.run.root))
    urls = []
    for path in sorted(layout.work.glob("chunk-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row["reason"] == "kept" and not row["caption"]:
                urls.append(row["url"])
    return urls


def test_uncaptioned_rows_get_a_caption_recorded_as_generated(captioned, tiny_models_dir):
    config, summary = captioned
    rows = _shard_rows(config)
    # Without a metadata_file the metadata.jsonl rows have no caption either.
    uncaptioned = _kept_without_caption(config)
    assert len(uncaptioned) >= 4
    for url in uncaptioned:
        if url not in rows:  # dropped later as a duplicate
            continue
        row = rows[url]
        assert row["caption_origin"] == "generated" and row["caption"].strip(), url
        assert row["caption_model"].startswith(f"{tiny_models_dir.qwen2vl}@local:")
    given = [row for url, row in rows.items() if url not in uncaptioned]
    assert given and all(row["caption_origin"] == "given" for row in given)
    assert all(row["caption_model"] == "" for row in given)
    generated = sum(row["caption_origin"] == "generated" for row in rows.values())
    assert summary.generated_captions == generated > 0
    manifest = shard_format.read_manifest(Path(config.run.root) / "data")
    assert manifest["counts"]["generated_captions"] == generated
    assert manifest["encoders"]["captioner"]["model"] == str(tiny_models_dir.qwen2vl)


def test_contact_sheets_mark_generated_captions(captioned):
    from pipelines.data_inspect import inspect_dataset

    config, summary = captioned
    report = inspect_dataset(Path(config.run.root), samples_per_bucket=64)
    captions = [caption for sheet in report.sheets for caption in sheet.captions]
    generated = [
        row["caption"]
        for row in _shard_rows(config).values()
        if row["caption_origin"] == "generated"
    ]
    marked = [caption for caption in captions if caption.startswith("[generated] ")]
    # Every sample is on a sheet (64 per bucket is more than the tiny set has), so every
    # generated caption is marked and no given one is.
    assert len(captions) == summary.encoded
    assert sorted(marked) == sorted(f"[generated] {caption}" for caption in generated)


def test_captions_over_the_token_cap_are_cut_and_counted(captioned, tiny_models_dir):
    config, summary = captioned
    tokenizer = AutoTokenizer.from_pretrained(tiny_models_dir.qwen2vl)
    rows = _shard_rows(config).values()
    cut = [row for row in rows if row["caption_truncated"]]
    assert summary.truncated_captions == len(cut) > 0
    for row in rows:
        length = len(tokenizer(row["caption"], add_special_tokens=False)["input_ids"])
        assert length <= CAP_TOKENS + 1, row  # decode + re-encode may merge one boundary


def test_a_rerun_captions_nothing_again(captioned):
    config, summary = captioned
    root = Path(config.run.root) / "data"

    def state():
        return {
            path: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in shard_format.list_shards(root)
        }

    before = state()
    again = run_data(config, show_progress=False)
    # No shard was written again (same bytes, same times): nothing was encoded or captioned.
    assert state() == before
    assert again.generated_captions == summary.generated_captions


def test_training_and_inference_share_one_caption_cap(tiny_models_dir, make_tiny_config, tmp_path):
    with pytest.raises(
        ConfigError, match=r"max_caption_tokens \(64\) and infer.requests.max_prompt_tokens \(512\)"
    ):
        make_tiny_config(tmp_path, tiny_models_dir, "data.encode.max_caption_tokens=64")
