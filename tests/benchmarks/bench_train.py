"""Training throughput, measured side by side in one run.

(A) loop overhead: our Ray Train loop (`qwenflux train`'s `run_training`, one worker, MLflow
    logging, checkpoints, progress bar) against a bare torch loop in this process (same model
    built by the same code, same optimizer, same batches preloaded in memory, same loss and
    random draws, no Ray, no logging), in seconds per optimizer step at steady state. Ours is
    the median interval between consecutive step metrics in MLflow (so it includes loading,
    logging and everything else between two steps); the bare loop's is the median step time.
    The bare loop's per-step losses are checked against the ones our loop logged.
(B) loader: `plan_steps` + `load_micro_batch` from the shards alone (what a worker does before
    each micro-batch), in samples per second, against the samples per second the training step
    consumes (part A's bare step time).
(C) GPU mode (only where CUDA is available, or `--block-smoke` to run its code on CPU at toy
    width): one FLUX.1-dev-sized double-stream and single-stream block trained in bf16 autocast
    with fp32 masters (the trainer's precision), model FLOPs from the planner's formulas, MFU
    against the card's dense bf16 peak.

    python tests/benchmarks/bench_train.py [--steps N] [--repeats R] [--block-smoke]

Not a pytest module. Builds tiny models and a tiny dataset under .tmp/bench_train unless
--models / --dataset point at existing ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from pipelines.environment import apply_quiet_environment  # noqa: E402

LOOP_TARGET = 1.10
LOADER_TARGET = 10.0
WARMUP_STEPS = 2
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 peaks (vendor data sheets, SXM parts for A100/H100/H200)."""


def main() -> int:
    args = _parser().parse_args()
    apply_quiet_environment()
    work = (REPO_ROOT / ".tmp" / "bench_train").resolve()
    os.environ["TMPDIR"] = str(work / "tmp")
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    config = _config(args, work)
    print(f"dataset {config.train.dataset}; {args.steps} steps of stage 1; 1 worker, 1 thread")

    ours = measure_ray_loop(config, work / f"ray-{int(time.time())}", steps=args.steps)
    bare = measure_bare_loop(config, steps=args.steps, repeats=args.repeats)
    loss_gap = max(abs(a - b) for a, b in zip(ours["losses"], bare["losses"], strict=True))
    loader = measure_loader(config, steps=args.steps, repeats=args.repeats)

    ours_step = statistics.median(ours["intervals"])
    bare_step = min(bare["medians"])
    samples_per_step = config.train.micro_batch_size * config.train.accumulation_steps
    consumed = samples_per_step / bare_step
    print("\n(A) seconds per optimizer step, steady state (median; bare loop: best repeat)")
    print(f"  bare torch loop      {bare_step:.4f} s  (repeats {_fmt(bare['medians'])})")
    print(f"  our Ray Train loop   {ours_step:.4f} s  ({len(ours['intervals'])} intervals)")
    print(f"  ratio ours / bare    {ours_step / bare_step:.3f}  (target <= {LOOP_TARGET})")
    print(f"  same losses: max |ours - bare| over {len(bare['losses'])} steps = {loss_gap:.2e}")
    print("\n(B) loader vs consumption (samples/s)")
    print(f"  loader alone         {loader:.1f}  (best of {args.repeats})")
    print(f"  step consumes        {consumed:.2f}  ({samples_per_step} samples per step)")
    print(f"  ratio                {loader / consumed:.1f}x  (target >= {LOADER_TARGET})")

    import torch

    if torch.cuda.is_available():
        print("\n(C) FLUX.1-dev-sized blocks on", torch.cuda.get_device_name())
        block_mfu(device=torch.device("cuda"), width_scale=1, peak=_peak_tflops(args))
    elif args.block_smoke:
        print("\n(C) block MFU code on CPU at toy width (no GPU: no MFU reported)")
        block_mfu(device=torch.device("cpu"), width_scale=48, peak=None, tokens=(64, 16))
    else:
        print("\n(C) skipped: no CUDA device (run with --block-smoke to exercise it on CPU)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=14, help="stage-1 steps timed (>= 5)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the bare loop")
    parser.add_argument("--models", type=Path, help="folder with qwen2-vl/ and flux/")
    parser.add_argument("--dataset", type=Path, help="dataset root (holds manifest.json)")
    parser.add_argument("--block-smoke", action="store_true", help="run part C on CPU, toy size")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU")
    return parser


def _config(args, work: Path):
    """The tiny preset, one worker with one CPU, stage 1 timed (stages 2-3 one step each)."""
    from components.tiny_models import build_tiny_models
    from pipelines.config import load_config

    models = args.models or work / "models"
    if args.models is None and not (models / "tiny_models.json").exists():
        build_tiny_models(models, seed=0)
    overrides = [
        f"run.root={work / 'data-run'}",
        f"data.encode.qwen2vl={models / 'qwen2-vl'}",
        f"data.encode.flux={models / 'flux'}",
        "train.resources.num_workers=1",
        "train.resources.cpus_per_worker=1",
        f"train.stages.1.num_steps={args.steps}",
        "train.stages.1.warmup_steps=1",
        "train.stages.1.decay_steps=1",
        "train.checkpoint_every_steps=1000",
        "train.validate_every_steps=1000",
    ]
    for stage in (2, 3):
        overrides += [f"train.stages.{stage}.{key}=0" for key in ("warmup_steps", "decay_steps")]
        overrides.append(f"train.stages.{stage}.num_steps=1")
    dataset = args.dataset or work / "data-run" / "data"
    overrides.append(f"train.dataset={dataset}")
    config = load_config("tiny", overrides)
    if args.dataset is None and not (dataset / "manifest.json").exists():
        from pipelines.data import run_data

        print("building the tiny dataset ...")
        run_data(config, show_progress=False)
    return config


def measure_ray_loop(config, root: Path, *, steps: int) -> dict:
    """Run training through Ray Train; stage 1's step intervals and losses from MLflow."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import run_training
    from pipelines.train_tracking import tracking_uri

    config = dataclasses.replace(config, run=dataclasses.replace(config.run, root=str(root)))
    run_training(config)
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment_name)
    stage_name = config.train.stages[0].name
    (run,) = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if run.data.tags.get("stage") == stage_name
    ]
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(steps)), "stage 1 was not logged once per step"
    stamps = [m.timestamp / 1000 for m in history]
    intervals = [
        b - a for a, b in zip(stamps[WARMUP_STEPS:-1], stamps[WARMUP_STEPS + 1 :], strict=True)
    ]
    return {"intervals": intervals, "losses": [m.value for m in history]}


def _stage_setup(config):
    """What a worker builds for stage 1: model, optimizer, training index and step plans."""
    from components.training.loader import BucketIndex, LoaderConfig, plan_steps
    from components.training.loop import configure_stage, hold_out
    from components.training.model_loading import load_training_model
    from components.training.optimizer import build_optimizer

    dataset = Path(config.train.dataset)
    model, convention = load_training_model(
        config.data.encode, dataset_root=dataset, seed=config.run.seed
    )
    index, _ = hold_out(BucketIndex.from_dataset(dataset), config.train.num_validation_samples)
    stage = config.train.stages[0]
    parameters = configure_stage(model, stage)
    optimizer = build_optimizer(parameters, config.train.optimizer)
    loader = LoaderConfig(
        micro_batch_size=config.train.micro_batch_size,
        accumulation_steps=config.train.accumulation_steps,
        seed=config.run.seed,
    )
    plans = list(plan_steps(index, loader, num_steps=stage.num_steps, num_workers=1))
    return model, convention, optimizer, plans


def measure_bare_loop(config, *, steps: int, repeats: int) -> dict:
    """The same steps as a plain torch loop on preloaded batches; median step time per repeat."""
    import torch

    from components.training.loader import ShardReader, load_micro_batch
    from components.training.objective import flow_matching_step_loss, step_generator
    from components.training.optimizer import set_learning_rate

    torch.set_num_threads(1)
    medians, losses = [], []
    for _ in range(repeats):
        model, convention, optimizer, plans = _stage_setup(config)
        reader = ShardReader()
        accumulation = config.train.accumulation_steps
        batches = [
            [load_micro_batch(plan.micro_batch(0, m), reader=reader) for m in range(accumulation)]
            for plan in plans
        ]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stage = config.train.stages[0]
        times, losses = [], []
        for plan, micro_batches in zip(plans, batches, strict=True):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            total = 0.0
            for micro, batch in enumerate(micro_batches):
                generator = step_generator(
                    seed=config.run.seed, stage_index=0, step=plan.step, rank=0, micro=micro
                )
                loss = flow_matching_step_loss(
                    model,
                    batch,
                    objective=config.train.objective,
                    convention=convention,
                    generator=generator,
                )
                (loss / accumulation).backward()
                total += float(loss.detach()) / accumulation
            torch.nn.utils.clip_grad_norm_(params, config.train.optimizer.max_grad_norm)
            set_learning_rate(
                optimizer, stage=stage, step=plan.step, base=config.train.optimizer.learning_rate
            )
            optimizer.step()
            times.append(time.perf_counter() - started)
            losses.append(total)
        medians.append(statistics.median(times[WARMUP_STEPS:]))
    return {"medians": medians, "losses": losses}


def measure_loader(config, *, steps: int, repeats: int) -> float:
    """Samples per second of plan_steps + load_micro_batch alone (a fresh reader per repeat)."""
    from components.training.loader import ShardReader, load_micro_batch

    *_, plans = _stage_setup(config)
    best = 0.0
    for _ in range(repeats):
        reader = ShardReader()
        started = time.perf_counter()
        samples = 0
        for plan in plans:
            for micro in range(config.train.accumulation_steps):
                batch = load_micro_batch(plan.micro_batch(0, micro), reader=reader)
                samples += batch["vae_latent"].shape[0]
        best = max(best, samples / (time.perf_counter() - started))
    return best


def block_mfu(device, *, width_scale: int, peak: float | None, tokens=(4096, 512)) -> None:
    """Train one double- and one single-stream block with FLUX.1-dev's dims divided by
    `width_scale` (1 = the real block) in bf16 autocast over fp32 masters; print step time,
    achieved TFLOP/s and MFU against `peak` (TFLOP/s). Batch 8 x (image + text) tokens, the
    reference run's micro-batch at 1024x1024 with 512 reference-image tokens."""
    import torch
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    heads, head_dim = (24, 128) if width_scale == 1 else (2, max(8, 128 // width_scale))
    width = heads * head_dim
    image_tokens, text_tokens = tokens
    batch = 8 if device.type == "cuda" else 1
    torch.manual_seed(0)
    shape = {"dim": width, "num_attention_heads": heads, "attention_head_dim": head_dim}
    for name, block in (
        ("double", FluxTransformerBlock(**shape)),
        ("single", FluxSingleTransformerBlock(**shape)),
    ):
        block = block.to(device)
        optimizer = torch.optim.AdamW(block.parameters(), lr=1e-5, fused=device.type == "cuda")
        image = torch.randn(batch, image_tokens, width, device=device)
        text = torch.randn(batch, text_tokens, width, device=device)
        temb = torch.randn(batch, width, device=device)
        length = image_tokens + text_tokens
        rotary = (
            torch.ones(length, head_dim, device=device),
            torch.zeros(length, head_dim, device=device),
        )

        inputs = (image, text, temb, rotary)
        for _ in range(3):
            _block_step(block, optimizer, inputs, device)
        _sync(device)
        repeats = 10 if device.type == "cuda" else 2
        started = time.perf_counter()
        for _ in range(repeats):
            _block_step(block, optimizer, inputs, device)
        _sync(device)
        seconds = (time.perf_counter() - started) / repeats
        flops = batch * _block_train_flops(block, name, width, image_tokens, text_tokens)
        achieved = flops / seconds / 1e12
        line = f"  {name} block  width {width}: {seconds * 1e3:.1f} ms/step, {achieved:.1f} TFLOP/s"
        if peak:
            line += f", MFU {achieved / peak:.1%} of {peak:g}"
        if device.type == "cuda":
            line += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        print(line)


def _block_step(block, optimizer, inputs, device) -> None:
    """One training step of a lone block: bf16 autocast forward, fp32 loss, backward, AdamW."""
    import torch

    image, text, temb, rotary = inputs
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        text_out, image_out = block(image, text, temb, image_rotary_emb=rotary)
    loss = image_out.float().square().mean() + text_out.float().square().mean()
    loss.backward()
    optimizer.step()


def _block_train_flops(block, name: str, width: int, image_tokens: int, text_tokens: int):
    """Model FLOPs of forward + backward (every weight trainable) for one sample, counted as the
    planner counts them (components/training/capacity.py): 6 x token-wise params x tokens,
    12 L^2 D attention."""
    from components.training.capacity_measure import block_shape

    shape = block_shape(block, 0, is_double=name == "double")
    linear = 6 * (shape.image_token_params * image_tokens + shape.text_token_params * text_tokens)
    return linear + 12 * (image_tokens + text_tokens) ** 2 * width


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_tflops(args) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    print(f"  unknown card {name!r}: pass --peak-tflops for MFU")
    return None


def _fmt(values) -> str:
    return ", ".join(f"{value:.4f}" for value in values)


if __name__ == "__main__":
    sys.exit(main())
