"""Batch-inference throughput, measured side by side in one run.

(A) per actor: `pipelines.infer.run_inference` with one Ray Data actor against the same work in a
    plain loop in this process (parse the request, generate, write the PNG; one torch thread
    each, as the actor gets one CPU), in images per second.
(B) scaling: the batch path with 2 actors against 1.

Rates are steady-state: (images - 1) / (last finish - first finish), from the `finished_at`
column of the results table (the plain loop records the same times), so Ray start-up and the
actors' model loading are left out of both; they are printed apart (wall time to the first
image).

    python tests/benchmarks/bench_infer.py [--requests N] [--steps S] [--repeats R]

The model is the tiny preset's untrained weights exported as a package (throughput does not
depend on training); requests alternate text and variation at 128x128. Not a pytest module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pipelines.environment import apply_quiet_environment  # noqa: E402

PER_ACTOR_TARGET = 0.95


def main() -> int:
    args = _parser().parse_args()
    apply_quiet_environment()
    work = (REPO_ROOT / ".tmp" / "bench_infer").resolve()
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(work / "tmp")
    package = _package(work)
    requests = _requests(work, count=args.requests, steps=args.steps)
    print(f"package {package}; {args.requests} requests, {args.steps} steps, 128x128")

    plain = []
    batch = {actors: [] for actors in (1, 2)}
    startup = {actors: [] for actors in (1, 2)}
    for _ in range(args.repeats):
        plain.append(_plain_loop(package, requests, work))
        for actors in (1, 2):
            rate, first = _batch_rate(package, requests, work, actors=actors)
            batch[actors].append(rate)
            startup[actors].append(first)

    best_plain = max(plain)
    print("\n(A) images/s per actor (best of repeats)")
    print(f"  plain loop, 1 thread     {best_plain:.2f}  ({_fmt(plain)})")
    print(f"  batch path, 1 actor      {max(batch[1]):.2f}  ({_fmt(batch[1])})")
    print(
        f"  ratio batch / plain      {max(batch[1]) / best_plain:.3f}"
        f"  (target >= {PER_ACTOR_TARGET})"
    )
    print("\n(B) actors")
    print(f"  batch path, 2 actors     {max(batch[2]):.2f}  ({_fmt(batch[2])})")
    print(f"  ratio 2 actors / 1       {max(batch[2]) / max(batch[1]):.2f}")
    print(
        "  wall time to the first image (Ray start + actor model load + 1 image), s: "
        f"1 actor {statistics.median(startup[1]):.1f}, 2 actors {statistics.median(startup[2]):.1f}"
    )
    print(f"  machine: {os.cpu_count()} CPUs")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per image")
    parser.add_argument("--repeats", type=int, default=2)
    return parser


def _config(work: Path, *overrides: str):
    from pipelines.config import load_config

    models = work / "models"
    return load_config(
        "tiny",
        [
            f"run.root={work / 'run'}",
            f"data.encode.qwen2vl={models / 'qwen2-vl'}",
            f"data.encode.flux={models / 'flux'}",
            *overrides,
        ],
    )


def _package(work: Path) -> Path:
    """The tiny preset's untrained model (seeded connector, base tail) as a model package."""
    package = work / "package"
    if (package / "package.json").is_file():
        return package
    import torch
    from checkpoint_files import write_checkpoint

    from components.inference.generator_parts import GeneratorSettings
    from components.inference.package import export_package
    from components.tiny_models import build_tiny_models
    from components.training.encoder_tail import load_qwen2vl_tail
    from model.conditioning import Connector

    models = build_tiny_models(work / "models", seed=0)
    config = _config(work)
    tail = load_qwen2vl_tail(str(models.qwen2vl))
    torch.manual_seed(config.run.seed)
    flux_config = json.loads((models.flux / "transformer" / "config.json").read_text())
    connector = Connector(tail.norm.weight.shape[0], flux_config["joint_attention_dim"])
    weights = {f"tail.{name}": value for name, value in tail.state_dict().items()}
    weights.update({f"connector.{name}": value for name, value in connector.state_dict().items()})
    weights = {
        name: value.contiguous() for name, value in weights.items() if "inv_freq" not in name
    }
    checkpoint = work / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    write_checkpoint(checkpoint, weights)
    vae = json.loads((models.flux / "vae" / "config.json").read_text())
    export_package(
        checkpoint_dir=checkpoint,
        qwen2vl=str(models.qwen2vl),
        qwen2vl_revision=None,
        flux=str(models.flux),
        flux_revision=None,
        settings=GeneratorSettings(
            instruction=config.data.encode.instruction,
            image_tokens=config.data.encode.image_tokens,
            vae_scaling_factor=float(vae["scaling_factor"]),
            vae_shift_factor=float(vae.get("shift_factor") or 0.0),
            guidance=config.train.objective.guidance,
        ),
        lineage={"source": "bench_infer: untrained tiny weights"},
        out_dir=package,
    )
    return package


def _requests(work: Path, *, count: int, steps: int) -> Path:
    from PIL import Image, ImageDraw

    folder = work / "requests"
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (128, 128), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((32, 32, 96, 96), fill=(220, 30, 30))
    image.save(folder / "reference.png")
    rows = []
    for index in range(count):
        if index % 2:
            row = {"mode": "variation", "image": "reference.png"}
        else:
            row = {"mode": "text", "prompt": f"a red circle number {index}"}
        rows.append({**row, "id": f"r{index:04d}", "seed": index, "steps": steps})
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _plain_loop(package: Path, requests: Path, work: Path) -> float:
    """Images/s of parse + generate + PNG in a loop here, one torch thread, model preloaded."""
    import torch

    from components.inference.generator import Generator
    from components.inference.package import load_package
    from components.inference.request_rows import RequestDefaults, parse_request, read_request_rows

    torch.set_num_threads(1)
    config = _config(work)
    generator = Generator(load_package(package), device="cpu", compute_dtype="float32")
    defaults = config.infer.requests
    assert isinstance(defaults, RequestDefaults)
    out = work / "plain"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    finished = []
    for row in read_request_rows(requests):
        request = parse_request(row, base_dir=requests.parent, defaults=defaults)
        generator.generate(request).save(out / f"{row['id']}.png", format="PNG")
        finished.append(time.time())
    return _steady_rate(finished)


def _batch_rate(package: Path, requests: Path, work: Path, *, actors: int) -> tuple[float, float]:
    """Steady-state images/s of run_inference, and its wall seconds to the first image."""
    import pyarrow.parquet as pq

    from pipelines.infer import run_inference

    config = _config(work, f"infer.num_actors={actors}", "infer.cpus_per_actor=1")
    out = work / f"batch-{actors}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    summary = run_inference(
        config, model=str(package), requests=requests, out_dir=out, show_progress=False
    )
    assert summary.failed == 0 and summary.ok == summary.total, summary.format()
    finished = pq.read_table(out / "results.parquet").column("finished_at").to_pylist()
    return _steady_rate(finished), min(finished) - started


def _steady_rate(finished: list[float]) -> float:
    return (len(finished) - 1) / (max(finished) - min(finished))


def _fmt(values) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    sys.exit(main())
