"""What each Ray Train worker runs: the component training loop, with Ray adapted around it.

Ray supplies the worker's rank and device, the checkpoint to resume from, and takes each
checkpoint the loop publishes (`ray.train.report`); rank 0 also gets the MLflow stage tracker
as the loop's metric sink. Everything the loop does per step lives in
components/training/loop.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from components.training.checkpoint_state import read_train_state
from components.training.fsdp import shard_model
from components.training.loop import Collectives, LoopData, TrainingLoop
from components.training.loop_config import LoopConfig
from components.training.model_loading import load_training_model
from model.flux_forward import set_gradient_checkpointing
from pipelines.config import PipelineConfig
from pipelines.config_loading import build
from pipelines.environment import apply_quiet_environment
from pipelines.train_tracking import StageTracker


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point; `payload` holds the plain config and the MLflow parent run id."""
    import ray.train
    import ray.train.torch

    apply_quiet_environment()  # a Ray job's workers get no driver runtime_env (ray_session.py)
    config: PipelineConfig = build(PipelineConfig, payload["config"])
    context = ray.train.get_context()
    collectives = Collectives(rank=context.get_world_rank(), world=context.get_world_size())
    resources = config.train.resources
    torch.set_num_threads(max(1, math.floor(resources.cpus_per_worker)))
    device = ray.train.torch.get_device()
    dataset_root = Path(payload["dataset_root"])
    model, convention = load_training_model(
        config.data.encode,
        dataset_root=dataset_root,
        seed=config.run.seed,
        device=device,
        init_from=Path(payload["init_package"]) if payload.get("init_package") else None,
        text_branch=config.train.text_branch,
    )
    settings = loop_config(config, device=device)
    if resources.strategy == "fsdp":
        shard_model(model, device=device, compute_bf16=settings.compute_bf16)
    else:
        model.to(device)
    set_gradient_checkpointing(model.transformer, enabled=resources.gradient_checkpointing)
    data = LoopData.from_dataset(
        dataset_root, num_validation_samples=config.train.num_validation_samples, device=device
    )
    loop = TrainingLoop(
        model,
        config=settings,
        convention=convention,
        data=data,
        collectives=collectives,
    )
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # Each worker reads the pieces its shards cover, whatever number of workers wrote them.
        with checkpoint.as_directory() as folder:
            state = read_train_state(Path(folder))
            loop.restore(state)
    tracker = None
    if collectives.rank == 0:
        tracker = StageTracker(config, parent_run_id=payload["parent_run_id"])
    loop.run(state, sink=tracker, publish=report_checkpoint)
    if tracker is not None:
        tracker.finish()


def report_checkpoint(folder: Path, metrics: dict[str, float]) -> None:
    """The loop's checkpoint publisher under Ray Train: every worker reports its own folder,
    and Ray Train merges them into one checkpoint in the training's storage."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def loop_config(config: PipelineConfig, *, device: torch.device) -> LoopConfig:
    """The loop's settings from the pipeline's train section and the worker's device."""
    train = config.train
    return LoopConfig(
        stages=train.stages,
        optimizer=train.optimizer,
        objective=train.objective,
        guard=train.guard,
        micro_batch_size=train.micro_batch_size,
        accumulation_steps=train.accumulation_steps,
        validate_every_steps=train.validate_every_steps,
        checkpoint_every_steps=train.checkpoint_every_steps,
        seed=config.run.seed,
        compute_bf16=train.resources.computes_in_bf16(on_gpu=device.type == "cuda"),
        async_checkpoints=train.async_checkpoints,
        ema=train.ema,
    )
