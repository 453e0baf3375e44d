"""The data workflow: sources -> source registry -> (url policy -> img2dataset) or direct reads
of local files (Ray tasks) -> filters -> buckets -> dedup -> encoder actor pool (Ray Data) ->
Parquet shards + a manifest per dataset version.

Each image is decoded and fitted to its bucket once, in the chunk task; the encoder actors read
the fitted pixels from the chunk's fitted files (pipelines/data_layout.py).

Unit of resume: a chunk of source rows for download/filter/bucket (one outcome file per chunk)
and a (chunk, bucket) group for encoding (one shard file per group). A rerun of the same config
skips every piece whose file exists, so a killed run finishes with exactly the keys of an
uninterrupted one. Every source row ends in exactly one outcome row ("kept" or a reason).

Growth (pipelines/data_sources.py): rows of a new source or list, or new rows of a known one, are
registered in new chunks, so a refresh downloads and encodes only them; every earlier chunk
already has its outcome file and shards. Dedup keeps the lowest key and compares later rows with
kept rows only, so new rows never change what earlier versions kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.data import shard_format
from components.data.buckets import build_buckets
from components.data.filters import find_duplicates, needs_caption
from pipelines.config import DataConfig, PipelineConfig
from pipelines.data_chunks import ChunkConfigs, ChunkSource, process_chunk
from pipelines.data_layout import DataLayout, read_fitted_slices, read_outcomes, write_table_atomic
from pipelines.data_report import DataSummary, build_manifest, write_encoder_description
from pipelines.data_sources import (
    Registry,
    SourceList,
    discover_lists,
    register_sources,
    state_fingerprint,
)
from pipelines.environment import apply_quiet_environment
from pipelines.ray_session import ray_session

ENCODE_SLICE_ROWS = 64
"""Samples encoded and written per slice inside one group (bounds actor memory)."""


STATE_VERSION = 3
"""2: the url lists are not part of the state (the dataset grows from them); 3: sources of
several kinds ([[data.sources]]), registry rows carry their source."""


class RunStateError(RuntimeError):
    """A run directory that holds a run of a different data config."""


def run_data(config: PipelineConfig, *, show_progress: bool = True) -> DataSummary:
    """Run (or resume) the whole data pipeline; returns the summary the manifest holds."""
    layout = DataLayout(Path(config.run.root))
    with _served_sources(config) as base_urls:
        _check_state(layout, config.data)
        synthetic = write_demo_corpus(config) if _has_synthetic(config.data) else None
        lists = discover_lists(config.data, synthetic_list=synthetic)
        registry = register_sources(layout, lists, config=config.data)
        chunks = registry.chunks()
        with ray_session(config.run, temp_root=layout.root):
            _process_chunks(
                chunks,
                layout=layout,
                config=config.data,
                sources=_chunk_sources(registry, lists, config.data, base_urls),
                show_progress=show_progress,
            )
            duplicates = _mark_duplicates(layout, len(chunks), config.data)
            _encode_groups(
                layout,
                config=config.data,
                duplicates=duplicates,
                chunk_sources={i: pair[0] for i, pair in registry.chunk_lists().items()},
                show_progress=show_progress,
            )
        return build_manifest(layout, config=config, registry=registry, duplicates=duplicates)


def _has_synthetic(config: DataConfig) -> bool:
    return any(source.kind == "synthetic" for source in config.sources)


@contextlib.contextmanager
def _served_sources(config: PipelineConfig) -> Iterator[dict[str, str]]:
    """{source name: base url} of a loopback server per source that serves a folder (a url
    list's `serve_dir`, the synthetic corpus' folder), up for the run."""
    from components.data.loopback_server import LoopbackServer

    folders = {
        source.name: source.serve_dir
        for source in config.data.sources
        if source.kind == "url_list" and source.serve_dir
    }
    for source in config.data.sources:
        if source.kind == "synthetic":
            folders[source.name] = str(_corpus_folder(config))
    with contextlib.ExitStack() as stack:
        base_urls = {}
        for name, folder in folders.items():
            Path(folder).mkdir(parents=True, exist_ok=True)
            base_urls[name] = stack.enter_context(LoopbackServer(Path(folder))).base_url
        yield base_urls


def _chunk_sources(
    registry: Registry, lists: list[SourceList], config: DataConfig, base_urls: dict[str, str]
) -> dict[int, ChunkSource]:
    """What each chunk task reads: its source's kind and reader, its list's path, base url."""
    paths = {(item.source, item.name): item.path for item in lists}
    chunk_sources = {}
    for index, (source_name, list_name) in registry.chunk_lists().items():
        source = config.source(source_name)
        chunk_sources[index] = ChunkSource(
            kind=source.kind,
            reader=source.reader_config(),
            list_path=paths[(source_name, list_name)],
            base_url=base_urls.get(source_name, ""),
        )
    return chunk_sources


def _corpus_folder(config: PipelineConfig) -> Path:
    return DataLayout(Path(config.run.root)).data / "corpus"


def write_demo_corpus(config: PipelineConfig) -> Path:
    """The synthetic source's corpus: written once (deterministic from the seed) into
    <root>/data/corpus/; returns its url list."""
    from components.data.demo_corpus import write_synthetic_corpus, write_url_list

    folder = _corpus_folder(config)
    url_list = folder / "urls.parquet"
    if not url_list.exists():
        items = write_synthetic_corpus(
            folder,
            count=config.data.synthetic.count,
            seed=config.run.seed,
            max_side_px=config.data.synthetic.max_side_px,
        )
        write_url_list(items, url_list)
    return url_list


def _check_state(layout: DataLayout, config: DataConfig) -> None:
    state = {"state_version": STATE_VERSION, "config_hash": state_fingerprint(config)}
    if not layout.state.exists():
        shard_format.write_json_atomic(layout.state, state)
        return
    previous = json.loads(layout.state.read_text())
    if previous.get("state_version") != STATE_VERSION:
        raise RunStateError(
            f"{layout.state}: this run directory was made by an older version of the data "
            "pipeline; choose a new run.root"
        )
    if previous.get("config_hash") != state["config_hash"]:
        raise RunStateError(
            f"{layout.state}: this run directory was started with a different data config "
            f"({previous.get('config_hash')}); growing or resuming a dataset needs the same "
            "data config (url lists aside) and encoders, or choose a new run.root"
        )


def _process_chunks(
    chunks: list[list[dict[str, Any]]],
    *,
    layout: DataLayout,
    config: DataConfig,
    sources: dict[int, ChunkSource],
    show_progress: bool,
) -> None:
    import ray

    from pipelines.console import progress as progress_bar

    task = ray.remote(num_cpus=config.resources.cpus_per_chunk_task, max_retries=2)(process_chunk)
    configs = ChunkConfigs(
        config.url_policy,
        config.download,
        config.filters,
        config.buckets,
        captioning=config.captioning.enabled,
    )
    pending = [
        task.remote(
            index, rows, layout_root=str(layout.root), config=configs, source=sources[index]
        )
        for index, rows in enumerate(chunks)
        if not layout.chunk_outcome(index).exists()
    ]
    with progress_bar(
        total=len(pending), desc="read+filter", unit="chunk", disable=not show_progress
    ) as progress:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
            progress.update(len(done))


def _mark_duplicates(layout: DataLayout, num_chunks: int, config: DataConfig) -> dict[str, tuple]:
    """Exact and near duplicates over all kept rows; the lowest key wins. Deterministic."""
    outcomes = read_outcomes(layout, num_chunks).filter(pa.compute.field("reason") == "kept")
    entries = [
        (row["sample_key"], row["image_sha256"], row["phash"])
        for row in outcomes.select(["sample_key", "image_sha256", "phash"]).to_pylist()
    ]
    duplicates = find_duplicates(entries, max_distance=config.filters.phash_max_distance)
    table = pa.table(
        {
            "sample_key": list(duplicates),
            "reason": [reason for reason, _ in duplicates.values()],
            "duplicate_of": [kept for _, kept in duplicates.values()],
        },
        schema=pa.schema(
            [("sample_key", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string())]
        ),
    )
    write_table_atomic(table, layout.duplicates)
    return duplicates


def _encode_groups(
    layout: DataLayout,
    *,
    config: DataConfig,
    duplicates: dict,
    chunk_sources: dict[int, str],
    show_progress: bool,
) -> None:
    """Encode every (chunk, bucket) group that has no shard yet on the encoder actor pool."""
    import ray

    from pipelines.console import progress as progress_bar

    groups = _pending_groups(layout, duplicates, chunk_sources)
    if not groups:
        return
    # Our own progress bar counts samples; Ray Data's per-operator log lines only add noise.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = config.resources
    results = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        GroupEncoder,
        fn_constructor_kwargs={"config": config},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(resources.num_encoders, len(groups))),
        num_cpus=resources.cpus_per_encoder,
        num_gpus=resources.gpus_per_encoder or None,
    )
    expected = sum(len(group["keys"]) for group in groups)
    written = 0
    with progress_bar(
        total=expected, desc="encode", unit="sample", disable=not show_progress
    ) as progress:
        for result in results.iter_rows():
            written += int(result["num_rows"])
            progress.update(int(result["num_rows"]))
    if written != expected:
        raise RuntimeError(f"encoder wrote {written} rows for {expected} pending samples")


def _pending_groups(
    layout: DataLayout, duplicates: dict, chunk_sources: dict[int, str]
) -> list[dict[str, Any]]:
    groups = []
    index = 0
    while layout.chunk_outcome(index).exists():
        kept = pq.read_table(layout.chunk_outcome(index)).to_pylist()
        by_bucket: dict[str, list[str]] = {}
        for row in kept:
            if row["reason"] == "kept" and row["sample_key"] not in duplicates:
                by_bucket.setdefault(row["bucket_id"], []).append(row["sample_key"])
        for bucket_id, keys in sorted(by_bucket.items()):
            if not shard_format.shard_path(layout.data, bucket_id, index).exists():
                groups.append(
                    {
                        "chunk_index": index,
                        "bucket_id": bucket_id,
                        "source": chunk_sources[index],
                        "keys": keys,
                        "layout_root": str(layout.root),
                    }
                )
        index += 1
    return groups


class GroupEncoder:
    """Ray Data actor: encodes whole (chunk, bucket) groups and writes one shard per group.

    Holds the encoders once per actor; input batch rows are group descriptors
    (chunk_index, bucket_id, keys); output rows are (shard path, num_rows).
    """

    def __init__(self, config: DataConfig):
        import torch

        apply_quiet_environment()  # a Ray job's workers get no driver runtime_env

        from components.data.encode import SampleEncoder

        self._config = config
        # One intra-op thread per reserved CPU: an inherited OMP_NUM_THREADS would oversubscribe.
        torch.set_num_threads(max(1, int(config.resources.cpus_per_encoder)))
        self._encoder = SampleEncoder(config.encode)
        self._captioner = None
        self._buckets = {bucket.bucket_id: bucket for bucket in build_buckets(config.buckets)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        paths, counts = [], []
        for position in range(len(batch["chunk_index"])):
            group = {name: batch[name][position] for name in batch}
            shard = self._encode_group(group, Path(str(group["layout_root"])))
            paths.append(shard.path)
            counts.append(shard.num_rows)
        return {"shard": paths, "num_rows": counts}

    def _encode_group(self, group: dict[str, Any], root: Path):
        index, bucket_id = int(group["chunk_index"]), str(group["bucket_id"])
        keys = [str(key) for key in group["keys"]]
        layout = DataLayout(root)
        write_encoder_description(layout, self._describe())
        bucket = self._buckets[bucket_id]
        outcomes = {
            row["sample_key"]: row for row in pq.read_table(layout.chunk_outcome(index)).to_pylist()
        }
        writer = shard_format.ShardWriter(
            shard_format.shard_path(layout.data, bucket_id, index),
            max_row_group_bytes=self._config.shards.max_row_group_bytes,
            compression=self._config.shards.compression,
        )
        slices = read_fitted_slices(
            layout.fitted_images(index, bucket_id), keys, bucket, slice_rows=ENCODE_SLICE_ROWS
        )
        try:
            for slice_keys, images in slices:
                rows = self._encode_slice(slice_keys, images, outcomes, bucket)
                writer.write_rows([{**row, "source": str(group["source"])} for row in rows])
            return writer.close()
        except BaseException:
            writer.abort()
            raise

    def _encode_slice(self, keys, images, outcomes, bucket) -> list[dict[str, Any]]:
        captions, origins = self._captions(keys, images, outcomes)
        fitted = [self._encoder.fit_caption(caption) for caption in captions]
        encoded = self._encoder.encode(images, [caption for caption, _ in fitted])
        return [
            {
                "sample_key": key,
                "url": outcomes[key]["url"],
                "caption": caption,
                "caption_origin": origin,
                "caption_model": model,
                "caption_truncated": truncated,
                "bucket_id": bucket.bucket_id,
                "width_px": bucket.width_px,
                "height_px": bucket.height_px,
                "source_width_px": outcomes[key]["source_width_px"],
                "source_height_px": outcomes[key]["source_height_px"],
                "image_sha256": outcomes[key]["image_sha256"],
            }
            | tensors
            for key, (caption, truncated), (origin, model), tensors in zip(
                keys, fitted, origins, encoded, strict=True
            )
        ]

    def _captions(self, keys, images, outcomes) -> tuple[list[str], list[tuple[str, str]]]:
        """The slice's captions and (origin, model) of each: given by the source, or generated
        for rows kept without a usable one (only when data.captioning is enabled)."""
        captions = [outcomes[key]["caption"] for key in keys]
        origins = [("given", "")] * len(keys)
        missing = [
            i for i, text in enumerate(captions) if needs_caption(text, self._config.filters)
        ]
        if missing and self._config.captioning.enabled:
            captioner = self._load_captioner()
            generated = captioner.caption([images[i] for i in missing])
            for position, text in zip(missing, generated, strict=True):
                captions[position] = text
                origins[position] = ("generated", captioner.model_id)
        return [text or "" for text in captions], origins

    def _describe(self) -> dict[str, Any]:
        description = self._encoder.describe()
        captioning, encode = self._config.captioning, self._config.encode
        if captioning.enabled:
            description["captioner"] = {
                "model": captioning.model or encode.qwen2vl,
                "revision": captioning.revision if captioning.model else encode.qwen2vl_revision,
                "instruction": captioning.instruction,
                "max_new_tokens": captioning.max_new_tokens,
                "image_tokens": captioning.image_tokens,
            }
        return description

    def _load_captioner(self):
        """The captioning model, loaded the first time a group has a row to caption."""
        if self._captioner is None:
            from components.data.captioning import Captioner

            config, encode = self._config.captioning, self._config.encode
            self._captioner = Captioner(
                config,
                checkpoint=config.model or encode.qwen2vl,
                revision=config.revision if config.model else encode.qwen2vl_revision,
                device=self._encoder.device,
                dtype=encode.compute_dtype,
            )
        return self._captioner
