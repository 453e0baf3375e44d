"""Throughput of the data pipeline's CPU stages, measured side by side in one run.

(A) download + filter + bucket: the pipeline's chunk stage for a `url_list` source
    (`pipelines.data_chunks.process_chunk` as Ray tasks, started by the pipeline's own
    `_process_chunks` with `_chunk_sources`; it decodes each image and fits it to its bucket,
    once) against `img2dataset.download` alone, both over the same synthetic corpus served on
    127.0.0.1 (the pipeline's list holds relative urls, resolved against the source's base url),
    in source rows per second.
(B) encode: `pipelines.data.GroupEncoder` actors on a Ray Data actor pool (the call
    `_encode_groups` makes) against one `GroupEncoder` looping in this process, on the same
    (chunk, bucket) groups of part A's output (their fitted images), in samples per second.
(C) folder read + filter + bucket: the chunk stage for a `folder` source (the same images as
    part A in one folder, a .txt caption sidecar each), listed and registered as a run does it,
    then `_process_chunks` on a fresh in-process Ray with 2 CPUs, timed from the first chunk
    submit to the last outcome file (ray.init and the listing on the driver are not in it, as
    in part A), against one plain loop in this process over the same files. The loop lists the
    folder (`folder_source.list_folder`, timed apart and not counted, like our driver-side
    listing), then per image reads the bytes (`read_image_bytes`, the chunk task's limit), runs
    `filter_sample` with the same FilterConfig and BucketConfig (decode, checks, sha256, pHash,
    fit to the bucket) and packs the fitted image to the raw RGB bytes the chunk task writes,
    keeping them in memory. It does not start Ray, pay cold imports, write the fitted files
    (Parquet + lz4) or the outcome file: all of that is in our time only. A third variant runs
    the same loop but writes the fitted images with the chunk tasks' FittedImageWriter instead
    of keeping them (the same output files, minus the outcome file), printed beside it. Every
    side must reach the same reason for every image, or the benchmark fails (every image has a
    caption, so data.captioning, off in the tiny preset, changes no decision). In images per
    second.

    python tests/benchmarks/bench_data.py [--images N] [--repeats R] [--folder-chunks K]
                                          [--parts ABC] [--max-side PX] [--bucket-side PX]

Every timed step is repeated and the best repeat is reported (the machine is shared); the two
sides of a part alternate which goes first. Not a pytest module. Only the standard library is
imported at import time: img2dataset starts its workers with spawn, which imports this file again
in every worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.environment import QUIET_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_ENV = QUIET_ENV
MAX_RAY_TEMP_CHARS = 44
DOWNLOAD_TARGET = 0.85
ENCODE_TARGET = 1.6
FOLDER_TARGET = 1.5
DOWNLOAD_BUDGET_SHARE = 0.4
"""Part A stops repeating after this share of --budget-s."""
FOLDER_BUDGET_SHARE = 0.55
"""Part C (run after A) stops repeating after this share of --budget-s; part B has the rest."""
DOWNLOAD_VARIANTS = ("img2dataset", "ours")
FOLDER_OURS = "folder ours"
FOLDER_SINGLE = "folder single loop"
FOLDER_SINGLE_WRITING = "folder single loop, writing"
FOLDER_VARIANTS = (FOLDER_OURS, FOLDER_SINGLE, FOLDER_SINGLE_WRITING)
FOLDER_SOURCE = "photos"
SINGLE_ONE_THREAD = "single, 1 torch thread"
POOL_ONE_THREAD = "pool, 1 torch thread"


@dataclass
class Timings:
    """Seconds per repeat of each measured variant, plus what each run produced."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    """CPU time the measured processes got in the same runs (encode variants only)."""
    details: dict[str, list[str]] = field(default_factory=dict)
    """What each run of a variant saw (threads, cores, start-up), per repeat."""
    notes: dict[str, str] = field(default_factory=dict)

    def add(
        self, name: str, seconds: float, cpu_seconds: float | None = None, detail: str = ""
    ) -> None:
        self.seconds.setdefault(name, []).append(seconds)
        self.details.setdefault(name, []).append(detail)
        if cpu_seconds is not None:
            self.cpu_seconds.setdefault(name, []).append(cpu_seconds)

    def best(self, name: str) -> float:
        return min(self.seconds[name])

    def best_detail(self, name: str) -> str:
        return self.details[name][self.seconds[name].index(self.best(name))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="synthetic corpus size")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per variant (best wins)")
    parser.add_argument("--max-side", type=int, default=512, help="longest side of the images")
    parser.add_argument(
        "--bucket-side",
        type=int,
        default=None,
        help="data.buckets.max_side_px (default: --max-side); smaller than --max-side makes "
        "every kept image a downscale, as camera photos are for a 512-px training run",
    )
    parser.add_argument("--threads", type=int, default=16, help="download threads per process")
    parser.add_argument("--encode-samples", type=int, default=192, help="samples encoded in (B)")
    parser.add_argument(
        "--folder-chunks",
        type=int,
        default=4,
        help="chunks the folder source of (C) is split into (data.resources.chunk_size = "
        "images / K, rounded up): at least 2 so both cores get a chunk task; more than 2 lets "
        "the faster worker take the next chunk",
    )
    parser.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=0,
        help="nice value of Ray workers (Ray's default is 15; 0 = same priority as img2dataset "
        "and the single loop, which is what a fair comparison on a shared machine needs)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="wall-time budget: fewer repeats are run when the machine is too slow for it",
    )
    parser.add_argument(
        "--parts",
        default="ABC",
        help="which parts to run, e.g. C or AB (B encodes part A's output, so it needs A)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if (
        not args.parts
        or set(args.parts) - set("ABC")
        or ("B" in args.parts and "A" not in args.parts)
    ):
        parser.error("--parts is a non-empty subset of ABC, and B needs A")
    if args.images < 24 or args.repeats < 1 or args.encode_samples < 2:
        parser.error("need --images >= 24, --repeats >= 1, --encode-samples >= 2")
    if not 2 <= args.folder_chunks <= args.images:
        parser.error("need 2 <= --folder-chunks <= --images")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in RUN_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    local_tmp = REPO_ROOT / ".tmp"
    local_tmp.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=local_tmp))
    # Every process that imports wandb (img2dataset does) leaves temp folders: keep them here.
    (work / "tmp").mkdir()
    os.environ["TMPDIR"] = str(work / "tmp")
    ray_temp = tempfile.mkdtemp(prefix="rb-", dir=local_tmp)
    if len(ray_temp) >= MAX_RAY_TEMP_CHARS:
        raise SystemExit(f"Ray temp folder {ray_temp} is too long for its unix sockets")
    started = time.perf_counter()
    load_before = os.getloadavg()
    print(
        f"work folder {work}, Ray temp {ray_temp}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f}",
        flush=True,
    )
    try:
        bench = Bench(args, work=work, ray_temp=ray_temp)
        bench.prepare()
        if "A" in args.parts:
            bench.run_download()
        if "C" in args.parts:
            bench.run_folder()
        if "B" in args.parts:
            bench.run_encode()
        bench.report()
        print(
            f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before[0]:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end; Ray worker niceness {args.ray_worker_niceness}; "
            f"benchmark wall time {time.perf_counter() - started:.0f} s"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(ray_temp, ignore_errors=True)
    return 0


class Bench:
    """Holds the corpus, configs and timings shared by parts A, B and C."""

    def __init__(self, args: argparse.Namespace, *, work: Path, ray_temp: str) -> None:
        self.args = args
        self.work = work
        self.ray_temp = ray_temp
        self.timings = Timings()
        self.chunk_size = math.ceil(args.images / 2)
        self.folder_chunk_size = math.ceil(args.images / args.folder_chunks)
        self.corpus = work / "corpus"
        self.folder = work / "folder"
        self.folder_reasons: dict[str, str] | None = None
        """Part C's reason per image relpath, from its first run; every later run must match."""
        self.encode_layout_root: Path | None = None
        self.started = time.perf_counter()

    def prepare(self) -> None:
        """Corpus, url lists (relative for the pipeline, absolute for img2dataset), the folder
        of part C (the same image files, a .txt caption sidecar each), models."""
        from components.data.demo_corpus import write_synthetic_corpus, write_url_list
        from components.tiny_models import build_tiny_models

        started = time.perf_counter()
        self.items = write_synthetic_corpus(
            self.corpus, count=self.args.images, seed=0, max_side_px=self.args.max_side
        )
        self.url_list = write_url_list(self.items, self.work / "urls.parquet")
        self.folder.mkdir()
        for item in self.items:
            shutil.copyfile(self.corpus / item.relpath, self.folder / item.relpath)
            if item.caption is not None:
                sidecar = (self.folder / item.relpath).with_suffix(".txt")
                sidecar.write_text(item.caption, encoding="utf-8")
        self.models = build_tiny_models(self.work / "models", seed=0)
        corpus_bytes = sum(path.stat().st_size for path in self.corpus.iterdir())
        print(
            f"corpus: {len(self.items)} images, {corpus_bytes / 2**20:.1f} MiB, "
            f"max side {self.args.max_side}, buckets up to "
            f"{self.args.bucket_side or self.args.max_side} px; tiny models built "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )

    def config(self, root: Path, *, folder: bool = False):
        """The tiny preset with one source: part A's url list (served, relative urls) or, with
        `folder`, part C's folder; the same filters and buckets either way."""
        from pipelines.config import load_config

        if folder:
            source = f"{{name = '{FOLDER_SOURCE}', kind = 'folder', paths = ['{self.folder}']}}"
        else:
            source = (
                "{name = 'web', kind = 'url_list', "
                f"paths = ['{self.url_list}'], serve_dir = '{self.corpus}'}}"
            )
        chunk_size = self.folder_chunk_size if folder else self.chunk_size
        return load_config(
            "tiny",
            [
                f"run.root={root}",
                f"data.sources=[{source}]",
                f"data.buckets.max_side_px={self.args.bucket_side or self.args.max_side}",
                "data.filters.min_side_px=64",
                f"data.download.thread_count={self.args.threads}",
                f"data.resources.chunk_size={chunk_size}",
                f"data.encode.qwen2vl={self.models.qwen2vl}",
                f"data.encode.flux={self.models.flux}",
            ],
        )

    def _ray_init(self) -> None:
        """In-process Ray on the 2 cores, its session files under the short run-local folder."""
        import ray

        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=self.ray_temp, log_to_driver=False)

    def _repeats(self, part: str, *, share: float) -> Iterator[int]:
        """Repeat indices; stops early when another repeat would overrun the time budget."""
        deadline = self.started + share * self.args.budget_s
        for repeat in range(self.args.repeats):
            began = time.perf_counter()
            yield repeat
            if time.perf_counter() + (time.perf_counter() - began) > deadline:
                if repeat + 1 < self.args.repeats:
                    self.timings.notes[f"part {part}"] = (
                        f"stopped after {repeat + 1} repeats to stay within --budget-s"
                    )
                return

    def run_download(self) -> None:
        """Part A, alternating which side goes first so drifting load hits both alike."""
        from components.data.demo_corpus import corpus_url_items, write_url_list
        from components.data.loopback_server import LoopbackServer

        with LoopbackServer(self.corpus) as server:
            absolute = corpus_url_items(self.items, base_url=server.base_url)
            absolute_list = write_url_list(absolute, self.work / "urls-absolute.parquet")
            for repeat in self._repeats("A", share=DOWNLOAD_BUDGET_SHARE):
                sides = [self._img2dataset_once, self._ours_once]
                if repeat % 2:
                    sides.reverse()
                for side in sides:
                    side(repeat, base_url=server.base_url, absolute_list=absolute_list)
        self._import_probe()

    def _import_probe(self) -> None:
        """What each chunk task pays for imports in a cold worker, before its first row."""
        import ray

        self._ray_init()
        try:
            probe = ray.remote(num_cpus=1)(cold_import_seconds)
            results = ray.get([probe.remote() for _ in range(2)])
        finally:
            ray.shutdown()
        for name in results[0]:
            self.timings.add(f"chunk task import: {name}", max(r[name] for r in results))

    def _img2dataset_once(self, repeat: int, *, base_url: str, absolute_list: Path) -> None:
        import img2dataset

        out = self.work / f"img2dataset-{repeat}"
        started = time.perf_counter()
        img2dataset.download(
            url_list=str(absolute_list),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="parquet",
            output_folder=str(out),
            processes_count=2,
            thread_count=self.args.threads,
            # One shard per process: with the default 10000 rows per shard one process idles.
            number_sample_per_shard=self.chunk_size,
            resize_mode="no",
            timeout=3,
        )
        elapsed = time.perf_counter() - started
        stats = [json.loads(path.read_text()) for path in out.glob("*_stats.json")]
        successes = sum(stat["successes"] for stat in stats)
        self.timings.add("img2dataset", elapsed)
        self.timings.notes["img2dataset"] = f"{successes} downloaded of {self.args.images}"
        print(f"[A{repeat}] img2dataset: {elapsed:.2f} s, {successes} downloaded", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    def _chunk_stage(self, root: Path, config, *, base_urls: dict[str, str]) -> tuple:
        """The chunk stage as run_data runs it: list and register the sources, then
        `_process_chunks` on a fresh in-process Ray, so chunk tasks start in cold workers.

        Returns (seconds from the first chunk submit to the last outcome, ray.init seconds,
        layout, number of chunks, seconds after the first submit at which each chunk's outcome
        file was written, from its mtime).
        """
        import ray

        from pipelines.data import _chunk_sources, _process_chunks
        from pipelines.data_layout import DataLayout
        from pipelines.data_sources import discover_lists, register_sources

        layout = DataLayout(root)
        lists = discover_lists(config.data)
        registry = register_sources(layout, lists, config=config.data)
        chunks = registry.chunks()
        sources = _chunk_sources(registry, lists, config.data, base_urls)
        started = time.perf_counter()
        self._ray_init()
        init_seconds = time.perf_counter() - started
        try:
            started, submitted_at = time.perf_counter(), time.time()
            _process_chunks(
                chunks, layout=layout, config=config.data, sources=sources, show_progress=False
            )
            elapsed = time.perf_counter() - started
        finally:
            ray.shutdown()
        finished = sorted(
            layout.chunk_outcome(index).stat().st_mtime - submitted_at
            for index in range(len(chunks))
        )
        return elapsed, init_seconds, layout, len(chunks), finished

    def _ours_once(self, repeat: int, *, base_url: str, absolute_list: Path) -> None:
        """Part A's pipeline side, its url list's relative urls resolved against base_url."""
        from pipelines.data_layout import read_outcomes

        root = self.work / f"ours-{repeat}"
        config = self.config(root)
        elapsed, init_seconds, layout, num_chunks, _ = self._chunk_stage(
            root, config, base_urls={"web": base_url}
        )
        reasons = Counter(read_outcomes(layout, num_chunks)["reason"].to_pylist())
        self.timings.add("ours", elapsed)
        self.timings.add("ray.init", init_seconds)
        self.timings.notes["ours"] = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        print(
            f"[A{repeat}] ours: {elapsed:.2f} s over {num_chunks} chunks "
            f"(ray.init {init_seconds:.2f} s), {dict(reasons)}",
            flush=True,
        )
        if self.encode_layout_root is not None:
            shutil.rmtree(self.encode_layout_root, ignore_errors=True)
        self.encode_layout_root = root

    def run_folder(self) -> None:
        """Part C, alternating which side goes first so drifting load hits both alike."""
        for repeat in self._repeats("C", share=FOLDER_BUDGET_SHARE):
            sides = [
                self._folder_ours_once,
                self._folder_single_once,
                lambda repeat: self._folder_single_once(repeat, write=True),
            ]
            shift = repeat % len(sides)
            for side in sides[shift:] + sides[:shift]:
                side(repeat)

    def _folder_ours_once(self, repeat: int) -> None:
        """The folder source's chunk stage as a run does it, in a fresh run root each repeat
        (a chunk with an outcome file is skipped)."""
        from pipelines.data_layout import read_outcomes

        root = self.work / f"folder-ours-{repeat}"
        config = self.config(root, folder=True)
        elapsed, init_seconds, layout, num_chunks, finished = self._chunk_stage(
            root, config, base_urls={}
        )
        outcomes = read_outcomes(layout, num_chunks).select(["url", "reason"]).to_pylist()
        prefix = f"{FOLDER_SOURCE}:"
        reasons = {row["url"].removeprefix(prefix): row["reason"] for row in outcomes}
        counts = self._check_folder_reasons("ours", reasons)
        self.timings.add(FOLDER_OURS, elapsed)
        self.timings.add("folder ray.init", init_seconds)
        self.timings.notes[FOLDER_OURS] = (
            f"{num_chunks} chunks of up to {self.folder_chunk_size} images, "
            f"{config.data.resources.cpus_per_chunk_task:g} CPU each"
        )
        print(
            f"[C{repeat}] ours: {elapsed:.2f} s over {num_chunks} chunks "
            f"(ray.init {init_seconds:.2f} s; outcome files written at "
            f"{', '.join(f'{at:.2f}' for at in finished)} s), {dict(sorted(counts.items()))}",
            flush=True,
        )
        shutil.rmtree(root, ignore_errors=True)

    def _folder_single_once(self, repeat: int, *, write: bool = False) -> None:
        """Part C's baseline: the module docstring says what it does and does not do. With
        `write`, the loop also writes the fitted images as the chunk tasks do (one
        FittedImageWriter over all images, in listing order), instead of keeping them."""
        from components.data.buckets import pack_fitted_image
        from components.data.filters import Rejection, filter_sample
        from components.data.folder_source import list_folder, read_image_bytes
        from components.data.local_sources import MAX_IMAGE_BYTES
        from pipelines.data_layout import SCORE_COLUMNS, DataLayout, FittedImageWriter

        name = FOLDER_SINGLE_WRITING if write else FOLDER_SINGLE
        root = self.work / f"folder-single-{repeat}"
        config = self.config(root, folder=True).data
        reader = config.source(FOLDER_SOURCE).reader_config()
        scores = dict.fromkeys(SCORE_COLUMNS)
        started = time.perf_counter()
        entries = list_folder(reader)
        list_seconds = time.perf_counter() - started
        reasons: dict[str, str] = {}
        fitted_bytes = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        kept: list[bytes] = []
        with FittedImageWriter(DataLayout(root), 0) if write else contextlib.nullcontext() as out:
            for entry in entries:
                data, reason, _ = read_image_bytes(entry, max_bytes=MAX_IMAGE_BYTES)
                if data is None:
                    reasons[entry.relpath] = reason or "unreadable"
                    continue
                result = filter_sample(
                    data,
                    entry.caption,
                    scores=scores,
                    config=config.filters,
                    buckets=config.buckets,
                )
                if isinstance(result, Rejection):
                    reasons[entry.relpath] = result.reason
                    continue
                reasons[entry.relpath] = "kept"
                fitted_bytes += result.bucket.width_px * result.bucket.height_px * 3
                if out is None:
                    kept.append(pack_fitted_image(result.fitted, result.bucket))
                else:
                    out.add(entry.relpath, result.bucket, result.fitted)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        counts = self._check_folder_reasons(name, reasons)
        self.timings.add(name, elapsed)
        self.timings.notes[name] = (
            f"listing {list_seconds:.2f} s (not counted), {cpu / elapsed:.2f} CPU s per s, "
            f"{fitted_bytes / 2**20:.0f} MiB of fitted pixels {'written' if write else 'kept'}"
        )
        print(
            f"[C{repeat}] {name}: {elapsed:.2f} s (listing {list_seconds:.2f} s apart), "
            f"{dict(sorted(counts.items()))}",
            flush=True,
        )
        shutil.rmtree(root, ignore_errors=True)

    def _check_folder_reasons(self, side: str, reasons: dict[str, str]) -> Counter:
        """Counts per reason; raises unless every image got the reason of part C's first run."""
        if len(reasons) != self.args.images:
            raise RuntimeError(f"part C: {side} saw {len(reasons)} of {self.args.images} images")
        if self.folder_reasons is None:
            self.folder_reasons = reasons
        expected = self.folder_reasons
        differing = sorted(key for key in reasons if reasons[key] != expected.get(key))
        if differing:
            first = differing[0]
            raise RuntimeError(
                f"part C: {side} gave {len(differing)} images another reason than the first "
                f"run did (first: {first}: {reasons[first]} vs {expected.get(first)})"
            )
        return Counter(reasons.values())

    def run_encode(self) -> None:
        """Part B on the last part-A run's layout; shards are deleted after every run.

        The pool variant with torch.set_num_threads(1) per actor only runs when the default
        actors report more than one torch thread (Ray sets OMP_NUM_THREADS per actor).
        """
        import ray

        self._ray_init()
        try:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            # Dispatch only once every actor is up: with ten groups, the seconds between the
            # first and the last actor finishing start-up would count as encoding time.
            context.wait_for_min_actors_s = 600
            groups, config = self._encode_groups_input()
            single = SingleLoop(config)
            self.timings.notes["single load"] = f"{single.load_seconds:.2f} s (not timed)"
            variants = ["single", SINGLE_ONE_THREAD, "pool"]
            for repeat in self._repeats("B", share=1.0):
                for name in variants if repeat % 2 == 0 else variants[::-1]:
                    if name.startswith("single"):
                        threads = 1 if name == SINGLE_ONE_THREAD else None
                        seconds, cpu, rows, detail = single.run(groups, torch_threads=threads)
                    else:
                        seconds, cpu, rows, seen, detail = self._pool_once(groups, config, name)
                        if max(seen) > 1 and POOL_ONE_THREAD not in variants:
                            variants.append(POOL_ONE_THREAD)
                    self.timings.add(name, seconds, cpu, detail)
                    print(
                        f"[B{repeat}] {name}: {rows} samples in {seconds:.2f} s ({detail})",
                        flush=True,
                    )
                    self._remove_shards()
        finally:
            ray.shutdown()

    def _encode_groups_input(self) -> tuple[list[dict[str, Any]], Any]:
        """The real _pending_groups, over an even share of each chunk's kept rows."""
        import pyarrow.parquet as pq

        from pipelines.data import _mark_duplicates, _pending_groups
        from pipelines.data_layout import DataLayout
        from pipelines.data_sources import read_registry

        layout = DataLayout(self.encode_layout_root)
        config = self.config(self.encode_layout_root).data
        num_chunks = len(list(layout.work.glob("chunk-*.parquet")))
        duplicates = _mark_duplicates(layout, num_chunks, config)
        per_chunk = math.ceil(self.args.encode_samples / num_chunks)
        skipped = dict(duplicates)
        for index in range(num_chunks):
            outcomes = pq.read_table(layout.chunk_outcome(index)).to_pylist()
            kept = [
                row["sample_key"]
                for row in outcomes
                if row["reason"] == "kept" and row["sample_key"] not in duplicates
            ]
            skipped.update({key: ("not_benchmarked", "") for key in kept[per_chunk:]})
        chunk_sources = {row["chunk_index"]: row["source"] for row in read_registry(layout)}
        groups = _pending_groups(layout, skipped, chunk_sources)
        self.encode_samples = sum(len(group["keys"]) for group in groups)
        sizes = Counter(group["bucket_id"] for group in groups for _ in group["keys"])
        self.timings.notes["groups"] = f"{len(groups)} groups, {dict(sorted(sizes.items()))}"
        print(
            f"encode input: {self.encode_samples} samples in {len(groups)} groups "
            f"{dict(sorted(sizes.items()))}",
            flush=True,
        )
        return groups, config

    def _pool_once(self, groups, config, variant: str) -> tuple:
        """map_batches exactly as _encode_groups calls it, with a timing subclass of the actor.

        Returns (encode span, actor CPU seconds in it, rows, torch threads seen, detail).
        """
        import ray

        log_dir = Path(tempfile.mkdtemp(prefix="pool-log-", dir=self.work))
        resources = config.resources
        threads = 1 if variant == POOL_ONE_THREAD else None
        submitted = time.time()
        results = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
            timed_group_encoder(str(log_dir), threads),
            fn_constructor_kwargs={"config": config},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(resources.num_encoders, len(groups))),
            num_cpus=resources.cpus_per_encoder,
            num_gpus=resources.gpus_per_encoder or None,
        )
        rows = sum(int(result["num_rows"]) for result in results.iter_rows())
        finished = time.time()
        if rows != self.encode_samples:
            raise RuntimeError(f"pool wrote {rows} rows for {self.encode_samples} samples")
        events = [json.loads(line) for path in log_dir.glob("*.jsonl") for line in path.open()]
        ready = [event["t"] for event in events if event["kind"] == "ready"]
        calls = [event for event in events if event["kind"] == "call"]
        span = max(call["end"] for call in calls) - min(call["start"] for call in calls)
        threads_seen = sorted({event["threads"] for event in events if event["kind"] == "ready"})
        cpu = sum(call["cpu"] for call in calls)
        calls_per_actor = sorted(Counter(call["pid"] for call in calls).values())
        busy = sum(call["end"] - call["start"] for call in calls) / (len(ready) * span)
        first = min(calls, key=lambda call: call["start"])
        last = max(calls, key=lambda call: call["end"])
        machine = (last["busy_end"] - first["busy_start"]) / span
        self.timings.add(f"{variant} end-to-end", finished - submitted)
        detail = (
            f"{len(ready)} actors, torch threads {threads_seen}, groups per actor "
            f"{calls_per_actor}, actors busy {busy:.0%} of the span, actors ready after "
            f"{max(ready) - submitted:.2f} s, end to end {finished - submitted:.2f} s, "
            f"machine busy {machine:.2f} of {os.cpu_count()} cores (ours {cpu / span:.2f})"
        )
        return span, cpu, rows, threads_seen, detail

    def _remove_shards(self) -> None:
        shutil.rmtree(self.encode_layout_root / "data" / "shards", ignore_errors=True)

    def report(self) -> None:
        timings = self.timings
        images = self.args.images
        print(f"\n== measured (best of {self.args.repeats} repeats each) ==")
        print(f"{'variant':<46}{'best s':>8}{'all s':>24}{'rate (best)':>18}")
        for name, values in timings.seconds.items():
            if name in DOWNLOAD_VARIANTS or name in FOLDER_VARIANTS:
                rate = f"{images / min(values):.1f} img/s"
            elif name in timings.cpu_seconds:
                rate = f"{self.encode_samples / min(values):.1f} samples/s"
            else:
                rate = ""
            listed = " ".join(f"{value:.2f}" for value in values)
            print(f"{name:<46}{min(values):>8.2f}{listed:>24}{rate:>18}")
        for name, note in timings.notes.items():
            print(f"  {name}: {note}")
        for name in timings.cpu_seconds:
            print(f"  {name} (best run): {timings.best_detail(name)}")
        if timings.cpu_seconds:
            self._print_cpu_use()
        rates = {
            name: (images if name in DOWNLOAD_VARIANTS + FOLDER_VARIANTS else self.encode_samples)
            / timings.best(name)
            for name in (*DOWNLOAD_VARIANTS, *FOLDER_VARIANTS, *timings.cpu_seconds)
            if name in timings.seconds
        }
        self._print_summary(rates)

    def _print_summary(self, rates: dict[str, float]) -> None:
        """The block the issue asks for, then the context needed to read it."""
        print()
        if "ours" in rates:
            ours, baseline = rates["ours"], rates["img2dataset"]
            print(
                f"download+filter+bucket: ours {ours:.1f} img/s, img2dataset {baseline:.1f} "
                f"img/s, ratio {ours / baseline:.2f} (target >= {DOWNLOAD_TARGET})"
            )
        if FOLDER_OURS in rates:
            folder_ours, folder_single = rates[FOLDER_OURS], rates[FOLDER_SINGLE]
            writing = rates[FOLDER_SINGLE_WRITING]
            print(
                f"folder read+filter+bucket: ours {folder_ours:.1f} img/s, single loop "
                f"{folder_single:.1f} img/s, ratio {folder_ours / folder_single:.2f} "
                f"(target >= {FOLDER_TARGET}); against the loop that also writes the fitted "
                f"files ({writing:.1f} img/s): ratio {folder_ours / writing:.2f}"
            )
        if "pool" in rates:
            self._print_encode_summary(rates)
        self._print_startup_context()

    def _print_encode_summary(self, rates: dict[str, float]) -> None:
        pool, single = rates["pool"], rates["single"]
        print(
            f"encode: pool {pool:.1f} samples/s, single {single:.1f} samples/s, "
            f"ratio {pool / single:.2f} (target >= {ENCODE_TARGET})"
        )
        single_one = rates[SINGLE_ONE_THREAD]
        print(
            f"encode vs single with 1 torch thread: single {single_one:.1f} samples/s, "
            f"ratio {pool / single_one:.2f}; pool samples per CPU second = "
            f"{self._per_cpu('pool') / self._per_cpu(SINGLE_ONE_THREAD):.2f} x single's"
        )
        if POOL_ONE_THREAD in rates:
            pool_one = rates[POOL_ONE_THREAD]
            print(f"encode, {POOL_ONE_THREAD}: {pool_one:.1f} samples/s, x{pool_one / single:.2f}")

    def _print_startup_context(self) -> None:
        """Each chunk stage's rate with its best ray.init added, and part C's outcome counts."""
        timings, images = self.timings, self.args.images
        for part, ours, init, baseline in (
            ("download", "ours", "ray.init", "img2dataset"),
            ("folder", FOLDER_OURS, "folder ray.init", FOLDER_SINGLE),
        ):
            if ours not in timings.seconds:
                continue
            with_init = images / (timings.best(ours) + timings.best(init))
            print(
                f"{part}, ours counting ray.init ({timings.best(init):.2f} s): "
                f"{with_init:.1f} img/s, ratio {with_init * timings.best(baseline) / images:.2f}"
            )
        if self.folder_reasons is not None:
            counts = Counter(self.folder_reasons.values())
            print(
                "folder outcomes, the same per image on every side in every repeat: "
                + ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
            )

    def _print_cpu_use(self) -> None:
        """Cores each encode variant got in its best run, and samples per CPU second.

        On a shared machine the pool can only scale with the cores it is given; samples per
        CPU second shows whether it wastes any of them, independent of the other load.
        """
        parts = []
        for name in self.timings.cpu_seconds:
            cores = self.encode_samples / self.timings.best(name) / self._per_cpu(name)
            parts.append(f"{name} {cores:.2f} cores, {self._per_cpu(name):.1f} samples/CPU-s")
        print("  encode CPU use (best run): " + "; ".join(parts))

    def _per_cpu(self, name: str) -> float:
        """Samples per CPU second our processes used in the variant's best run."""
        best = self.timings.seconds[name].index(self.timings.best(name))
        return self.encode_samples / self.timings.cpu_seconds[name][best]


class SingleLoop:
    """One GroupEncoder (one SampleEncoder) in this process, fed the groups one by one."""

    def __init__(self, config) -> None:
        import torch

        from pipelines.data import GroupEncoder

        started = time.perf_counter()
        self.encoder = GroupEncoder(config)
        self.load_seconds = time.perf_counter() - started
        self.default_threads = torch.get_num_threads()

    def run(self, groups: list[dict[str, Any]], *, torch_threads: int | None) -> tuple:
        """(seconds, CPU seconds, rows, detail) for encoding every group once."""
        import torch

        torch.set_num_threads(torch_threads or self.default_threads)
        rows = 0
        busy_started = machine_busy_seconds()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            for group in groups:
                batch = {name: [value] for name, value in group.items()}
                rows += sum(self.encoder(batch)["num_rows"])
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            machine = (machine_busy_seconds() - busy_started) / seconds
            detail = (
                f"torch threads {torch.get_num_threads()}, machine busy {machine:.2f} of "
                f"{os.cpu_count()} cores (ours {cpu / seconds:.2f})"
            )
            return seconds, cpu, rows, detail
        finally:
            torch.set_num_threads(self.default_threads)


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy since boot (every process, not only ours)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    ticks = [int(value) for value in fields[:8]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def cold_import_seconds() -> dict[str, float]:
    """Import times, in a fresh process, of what process_chunk needs and of what it drags in."""
    steps = {
        "filter/download modules": (
            "components.data.download",
            "components.data.filters",
            "components.data.url_policy",
            "pipelines.data_layout",
        ),
        "img2dataset": ("img2dataset.downloader",),
        "rest of pipelines.data": ("pipelines.data",),
    }
    seconds = {}
    for name, modules in steps.items():
        started = time.perf_counter()
        for module in modules:
            __import__(module)
        seconds[name] = time.perf_counter() - started
    return seconds


def timed_group_encoder(log_dir: str, torch_threads: int | None) -> type:
    """GroupEncoder that logs when it is ready and when each call starts and ends."""
    from pipelines.data import GroupEncoder

    class TimedGroupEncoder(GroupEncoder):
        def __init__(self, config) -> None:
            import torch

            if torch_threads is not None:
                torch.set_num_threads(torch_threads)
            super().__init__(config)
            self._log_path = Path(log_dir) / f"actor-{os.getpid()}-{id(self)}.jsonl"
            self._log({"kind": "ready", "t": time.time(), "threads": torch.get_num_threads()})

        def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
            started, cpu_started = time.time(), time.process_time()
            busy_started = machine_busy_seconds()
            result = super().__call__(batch)
            self._log(
                {
                    "kind": "call",
                    "start": started,
                    "end": time.time(),
                    "cpu": time.process_time() - cpu_started,
                    "busy_start": busy_started,
                    "busy_end": machine_busy_seconds(),
                    "pid": os.getpid(),
                }
            )
            return result

        def _log(self, event: dict[str, Any]) -> None:
            with self._log_path.open("a") as out:
                out.write(json.dumps(event) + "\n")

    return TimedGroupEncoder


if __name__ == "__main__":
    sys.exit(main())
