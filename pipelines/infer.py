"""Batch inference: a registered model + a requests file -> one PNG per request + a results table.

    qwenflux infer --model models:/NAME@champion --requests R.jsonl --out DIR

The driver resolves the model once (registry alias or version -> a local package folder), reads
the requests, drops ids already finished in DIR (a rerun generates only what is missing or
failed), and streams the rest through a Ray Data actor pool: every actor loads the model once
(`InferenceWorker`) and turns request rows into images and result rows. The driver writes the
result rows as Parquet parts while they arrive (atomic; a killed run keeps what it finished) and
at the end one `results.parquet` with the latest row per id. A bad request (components/inference/
request_rows.py: the parser, limits and checks the pyfunc model uses too) becomes a row with
status "error", the field and the message; the rest of the batch goes on. A row repeating an
earlier row's id is rejected (field "id") and kept as its own row, next to the id's result.

`qwenflux generate` runs one request through the same `InferenceWorker` in-process; the files
it names are its user's, so its local paths are not confined to a requests folder.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.inference.request_rows import (
    GENERATION_FIELD,
    RequestDefaults,
    RequestError,
    empty_result,
    generate_row,
    png_bytes,
    read_request_rows,
    request_id,
)
from components.inference.request_rows import RESULT_COLUMNS as REQUEST_RESULT_COLUMNS
from pipelines.environment import apply_quiet_environment

RESULTS_FILE = "results.parquet"
PARTS_DIR = "results-parts"
IMAGES_DIR = "images"
RESULT_COLUMNS = (
    *REQUEST_RESULT_COLUMNS,
    "request_row",
    "model_name",
    "model_version",
    "image_path",
    "generate_seconds",
    "total_seconds",
    "finished_at",
)
"""request_rows.RESULT_COLUMNS, then: request_row (0-based position in the requests file; None
for `qwenflux generate`), the model, the image (relative to the output folder; "" unless ok)
and timings."""
DUPLICATE_FIELD = "id"
"""error_field of a row whose id an earlier row of the requests file already has."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelRef:
    """A resolved model: the local package folder and its registry name and version."""

    package_dir: Path
    name: str
    version: str


@dataclass(frozen=True, kw_only=True, slots=True)
class InferSummary:
    """What a batch did, for the CLI and the tests."""

    model: ModelRef
    total: int
    skipped: int
    ok: int
    failed: int
    errors_by_field: dict[str, int]
    seconds: float
    out_dir: Path

    def format(self) -> str:
        lines = [
            f"model {self.model.name} version {self.model.version} ({self.model.package_dir})",
            f"requests {self.total}: {self.ok} generated, {self.failed} failed, "
            f"{self.skipped} already done (skipped)",
        ]
        for field_name, count in sorted(self.errors_by_field.items()):
            lines.append(f"  error in {field_name}: {count}")
        rate = self.ok / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"time {self.seconds:.1f} s ({rate:.2f} images/s)")
        lines.append(f"images:  {self.out_dir / IMAGES_DIR}")
        lines.append(f"results: {self.out_dir / RESULTS_FILE}")
        return "\n".join(lines)


class InferenceWorker:
    """One loaded model turning request rows into images (a Ray Data actor, or in-process)."""

    def __init__(
        self,
        *,
        package_dir: str,
        name: str,
        version: str,
        device: str,
        compute_dtype: str,
        out_dir: str,
        base_dir: str,
        defaults: dict[str, Any],
        controlnet: str = "",
        depth_detector: str = "",
        trust_local_paths: bool = False,
    ) -> None:
        apply_quiet_environment()  # a Ray job's workers get no driver runtime_env
        from dataclasses import replace

        from components.inference.control import load_controlnet, load_depth_detector
        from components.inference.generator import Generator
        from components.inference.package import load_package
        from pipelines.config_loading import build

        parts = load_package(Path(package_dir), name=name, version=version)
        # The ControlNet and the depth detector are frozen bases chosen at inference time:
        # loaded once per actor, next to the package's networks.
        parts = replace(
            parts,
            controlnet=load_controlnet(controlnet) if controlnet else None,
            depth_detector=(
                load_depth_detector(depth_detector, device=device) if depth_detector else None
            ),
        )
        self.generator = Generator(parts, device=device, compute_dtype=compute_dtype)
        self.name, self.version = name, version
        self.out_dir = Path(out_dir)
        self.base_dir = Path(base_dir)
        self.defaults = build(RequestDefaults, defaults)
        self.trust_local_paths = trust_local_paths
        (self.out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Ray Data batch: "row" holds each request row pickled, "request_row" its position; the
        result rows come back pickled in "result". Pickled, not Arrow columns: rows mix types
        (image bytes or paths) and a seed may exceed int64."""
        results = [
            self.run_one(pickle.loads(row), request_row=int(position))
            for row, position in zip(batch["row"], batch["request_row"], strict=True)
        ]
        return {"result": [pickle.dumps(result) for result in results]}

    def run_one(self, row: dict[str, Any], *, request_row: int | None = None) -> dict[str, Any]:
        """One request row (its id set) -> its RESULT_COLUMNS row; the PNG is written first."""
        started = time.perf_counter()
        outcome = generate_row(
            self.generator,
            row,
            base_dir=self.base_dir,
            defaults=self.defaults,
            trust_local_paths=self.trust_local_paths,
        )
        result = _empty_result(row["id"], self.name, self.version) | outcome.result
        result.update(request_row=request_row, generate_seconds=outcome.generate_seconds)
        if outcome.image is not None:
            path = self.out_dir / IMAGES_DIR / image_file_name(result["id"])
            try:
                _write_atomic(png_bytes(outcome.image), path)
                result["image_path"] = str(path.relative_to(self.out_dir))
            except Exception as error:  # a full disk on one image must not end the batch
                failure = RequestError(GENERATION_FIELD, f"{type(error).__name__}: {error}")
                result.update(status="error", error_field=failure.field, error=str(failure))
        result["total_seconds"] = time.perf_counter() - started
        result["finished_at"] = time.time()
        return result


def run_inference(
    config,
    *,
    model: str,
    requests: Path,
    out_dir: Path,
    show_progress: bool = True,
) -> InferSummary:
    """Generate every request of `requests` not yet finished in `out_dir` (see module doc)."""
    import ray

    from pipelines.ray_session import ray_session

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    requests = Path(requests).resolve()
    model_ref = resolve_model(config, model, cache_dir=out_dir / ".models")
    rows = read_request_rows(requests)
    done = finished_ids(out_dir)
    todo, duplicates, first_rows = [], [], {}
    for position, row in enumerate(rows):
        identifier = request_id(row, position)
        if identifier in first_rows:
            duplicates.append(_duplicate_result(identifier, position, first_rows, model_ref))
            continue
        first_rows[identifier] = position
        if identifier not in done:
            todo.append((position, {**row, "id": identifier}))
    results: list[dict[str, Any]] = list(duplicates)
    _write_part(out_dir, results)
    infer = config.infer
    worker_kwargs = _worker_kwargs(config, model_ref, out_dir=out_dir, base_dir=requests.parent)
    progress = _progress(len(todo), show_progress)
    if todo:
        with ray_session(config.run, temp_root=out_dir):
            dataset = ray.data.from_items(
                [{"row": pickle.dumps(row), "request_row": position} for position, row in todo],
                override_num_blocks=max(1, min(len(todo), infer.num_actors * 4)),
            )
            mapped = dataset.map_batches(
                InferenceWorker,
                fn_constructor_kwargs=worker_kwargs,
                batch_size=infer.batch_size,
                compute=ray.data.ActorPoolStrategy(size=infer.num_actors),
                num_cpus=infer.cpus_per_actor,
                num_gpus=infer.gpus_per_actor,
            )
            for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
                part = [pickle.loads(result) for result in batch["result"]]
                _write_part(out_dir, part)
                results.extend(part)
                progress.update(len(part))
    progress.close()
    write_results_table(out_dir)
    counts = Counter(result["status"] for result in results)
    fields = Counter(result["error_field"] for result in results if result["status"] != "ok")
    return InferSummary(
        model=model_ref,
        total=len(rows),
        skipped=len(rows) - len(todo) - len(duplicates),
        ok=counts["ok"],
        failed=counts["error"],
        errors_by_field=dict(fields),
        seconds=time.perf_counter() - started,
        out_dir=out_dir,
    )


def generate_one(config, *, model: str, row: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """One request through the same worker code, in this process; returns its result row."""
    out_dir = Path(out_dir).resolve()
    model_ref = resolve_model(config, model, cache_dir=out_dir / ".models")
    kwargs = _worker_kwargs(config, model_ref, out_dir=out_dir, base_dir=Path())
    worker = InferenceWorker(**kwargs, trust_local_paths=True)
    result = worker.run_one({**row, "id": request_id(row, 0)})
    _write_part(out_dir, [result])
    write_results_table(out_dir)
    return result


def resolve_model(config, model: str, *, cache_dir: Path) -> ModelRef:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, or a local package folder."""
    if model.startswith("models:/"):
        from components.inference.registry import resolve_package
        from pipelines.train_tracking import tracking_uri

        package_dir, name, version = resolve_package(
            model, tracking_uri=tracking_uri(config), dst=cache_dir
        )
        return ModelRef(package_dir=Path(package_dir), name=name, version=version)
    path = Path(model).resolve()
    if not (path / "package.json").is_file():
        raise FileNotFoundError(
            f"model {model!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor a "
            "package folder holding package.json"
        )
    return ModelRef(package_dir=path, name=path.name, version="local")


def finished_ids(out_dir: Path) -> set[str]:
    """Ids whose latest result is "ok" and whose image is on disk."""
    return {
        row["id"]
        for row in _latest_results(out_dir).values()
        if row["status"] == "ok" and (out_dir / str(row["image_path"])).is_file()
    }


def write_results_table(out_dir: Path) -> Path:
    """`results.parquet`: the latest result per id over all parts, and each rejected duplicate
    row (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(_latest_results(out_dir).values())
    table = pa.Table.from_pylist(rows, schema=_schema())
    path = out_dir / RESULTS_FILE
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)
    return path


def image_file_name(identifier: str) -> str:
    """A safe file name for a request id (unsafe characters replaced, hash suffix if changed)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", identifier)[:100]
    if safe != identifier or safe.startswith("."):
        digest = hashlib.sha256(identifier.encode("utf-8")).hexdigest()[:12]
        safe = f"{safe.lstrip('.')}-{digest}"
    return f"{safe}.png"


def _worker_kwargs(config, model: ModelRef, *, out_dir: Path, base_dir: Path) -> dict[str, Any]:
    from pipelines.config_loading import to_plain

    infer = config.infer
    return {
        "package_dir": str(model.package_dir),
        "name": model.name,
        "version": model.version,
        "device": infer.device,
        "compute_dtype": infer.compute_dtype,
        "out_dir": str(out_dir),
        "base_dir": str(base_dir),
        "defaults": to_plain(infer.requests),
        "controlnet": infer.controlnet,
        "depth_detector": infer.depth_detector,
    }


def _empty_result(identifier: str, name: str, version: str) -> dict[str, Any]:
    result = dict.fromkeys(RESULT_COLUMNS) | empty_result(identifier)
    result.update(model_name=name, model_version=version, image_path="")
    return result


def _duplicate_result(
    identifier: str, position: int, first_rows: dict[str, int], model: ModelRef
) -> dict[str, Any]:
    reason = f"duplicate id {identifier!r} (first at row {first_rows[identifier]})"
    result = _empty_result(identifier, model.name, model.version)
    error = RequestError(DUPLICATE_FIELD, reason)
    result.update(request_row=position, error_field=error.field, error=str(error))
    result.update(finished_at=time.time())
    return result


def _schema():
    import pyarrow as pa

    types = {
        "seed": pa.uint64(),
        "request_row": pa.int64(),
        "steps": pa.int64(),
        "width": pa.int64(),
        "height": pa.int64(),
        "generate_seconds": pa.float64(),
        "total_seconds": pa.float64(),
        "finished_at": pa.float64(),
    }
    return pa.schema([(column, types.get(column, pa.string())) for column in RESULT_COLUMNS])


def _write_part(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = out_dir / PARTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    clean = [{column: _plain(row.get(column)) for column in RESULT_COLUMNS} for row in rows]
    table = pa.Table.from_pylist(clean, schema=_schema())
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    temporary = folder / f".{name}"
    pq.write_table(table, temporary)
    os.replace(temporary, folder / name)


def _plain(value: Any) -> Any:
    """pandas/numpy scalars and NaN back to plain Python values for Arrow."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _latest_results(out_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The latest result row per _result_key over all parts, keys sorted."""
    import pyarrow.parquet as pq

    folder = Path(out_dir) / PARTS_DIR
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    if not folder.is_dir():
        return latest
    for part in sorted(folder.glob("part-*.parquet")):
        for row in pq.read_table(part).to_pylist():
            key = _result_key(row)
            previous = latest.get(key)
            # An ok result is final: a later failed run of the same id does not undo it.
            if previous is None or previous["status"] != "ok":
                latest[key] = row
    return dict(sorted(latest.items()))


def _result_key(row: dict[str, Any]) -> tuple[str, int]:
    """(id, -1) for an id's own result; (id, request_row) for a rejected duplicate row, so it
    neither replaces nor hides the result of the row that holds the id."""
    position = row.get("request_row")
    if row["error_field"] == DUPLICATE_FIELD and position is not None:
        return row["id"], position
    return row["id"], -1


def _write_atomic(data: bytes, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _progress(total: int, enabled: bool):
    from pipelines.console import progress

    return progress(total=total, desc="infer", unit="img", disable=not enabled)
