"""What each Ray Train worker runs: build the model, restore, walk the stages, report.

Stage k+1 continues from stage k's weights in memory; a restart (SIGKILL of the run, a killed
worker) restores the last checkpoint: the weights every stage so far touched, the optimizer,
the guard, the stage index and the next step. All randomness of a step is a function of
(seed, stage, step, rank, micro-batch) and the batch plan of step s is a function of s, so
resumed steps are the steps an uninterrupted run would take.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from components.training.fsdp import (
    full_tensor,
    gather_optimizer_state,
    gather_parameters,
    is_sharded,
    load_optimizer_state,
    reshard,
    set_gradient_sync,
    shard_model,
)
from components.training.loader import (
    BucketIndex,
    LoaderConfig,
    ShardReader,
    load_micro_batch,
    plan_steps,
)
from components.training.objective import (
    QwenFluxModel,
    StageConfig,
    StepGuard,
    build_optimizer,
    flow_matching_step_loss,
    set_learning_rate,
    step_generator,
    validation_losses,
    validation_samples,
)
from model.flux_forward import set_gradient_checkpointing
from model.flux_stages import block_prefix, select_trainable_blocks
from pipelines.config import PipelineConfig
from pipelines.config_loading import build
from pipelines.train_state import (
    TrainState,
    build_model,
    load_train_state,
    save_train_state,
)
from pipelines.train_tracking import StageTracker


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point; `payload` holds the plain config and the MLflow parent run id."""
    import ray.train
    import ray.train.torch

    config: PipelineConfig = build(PipelineConfig, payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, math.floor(config.train.resources.cpus_per_worker)))
    device = ray.train.torch.get_device()
    model, convention = build_model(config, dataset_root=Path(payload["dataset_root"]))
    resources = config.train.resources
    if resources.strategy == "fsdp":
        shard_model(model, device=device, compute_bf16=compute_bf16(resources, device))
    else:
        model.to(device)
    convention = dataclasses.replace(
        convention, empty_pooled_P=convention.empty_pooled_P.to(device)
    )
    set_gradient_checkpointing(model.transformer, enabled=resources.gradient_checkpointing)
    state = load_train_state(ray.train.get_checkpoint(), model)
    index = BucketIndex.from_dataset(Path(payload["dataset_root"]))
    train_index, validation_refs = hold_out(index, config.train.num_validation_samples)
    tracker = StageTracker(config, parent_run_id=payload["parent_run_id"]) if rank == 0 else None
    worker = _Worker(config, model=model, convention=convention, rank=rank, world=world)
    worker.device = device
    worker.validation_batch = to_device(
        load_micro_batch(validation_refs, reader=worker.reader), device
    )
    start_stage = state.stage_index if state else 0
    for stage_index in range(start_stage, len(config.train.stages)):
        resume = state if state and state.stage_index == stage_index else None
        worker.run_stage(stage_index, index=train_index, resume=resume, tracker=tracker)
        state = None
    if tracker is not None:
        tracker.finish()


def hold_out(index: BucketIndex, count: int) -> tuple[BucketIndex, tuple]:
    """The last `count` rows of the largest bucket become the validation set, never trained on."""
    largest = max(index.buckets.values(), key=lambda bucket: (bucket.num_rows, bucket.bucket_id))
    if largest.num_rows <= count:
        raise ValueError(
            f"bucket {largest.bucket_id} has {largest.num_rows} rows: too few to hold out "
            f"{count} validation samples (lower train.num_validation_samples)"
        )
    cut = largest.num_rows - count
    validation = largest.locate(list(range(cut, largest.num_rows)))
    kept = [start for start in largest.row_starts[:-1] if start < cut]
    trimmed = dataclasses.replace(
        largest,
        shard_paths=largest.shard_paths[: len(kept)],
        row_starts=(*kept, cut),
    )
    buckets = {**index.buckets, largest.bucket_id: trimmed}
    return dataclasses.replace(index, buckets=buckets), validation


class _Worker:
    """One worker's loop state: model, reader, gradient averaging, step metrics."""

    def __init__(self, config: PipelineConfig, *, model: QwenFluxModel, convention, rank, world):
        self.config = config
        self.model = model
        self.convention = convention
        self.rank = rank
        self.world = world
        self.reader = ShardReader()
        self.validation_batch: dict[str, Any] = {}
        self.device = torch.device("cpu")

    def run_stage(self, stage_index: int, *, index, resume: TrainState | None, tracker) -> None:
        train = self.config.train
        stage = train.stages[stage_index]
        parameters = configure_stage(self.model, stage)
        optimizer = build_optimizer(parameters, train.optimizer)
        guard = StepGuard(train.guard)
        if resume is not None:
            load_optimizer_state(self.model, optimizer, resume.optimizer_state)
            guard.load_state_dict(resume.guard_state)
        start_step = resume.next_step if resume else 0
        loader = LoaderConfig(
            micro_batch_size=train.micro_batch_size,
            accumulation_steps=train.accumulation_steps,
            seed=self.config.run.seed + stage_index,
        )
        plans = plan_steps(
            index, loader, num_steps=stage.num_steps, num_workers=self.world, start_step=start_step
        )
        if tracker is not None:
            tracker.start_stage(stage_index, stage, num_trainable=_count(parameters))
        for plan in plans:
            metrics = self.run_step(plan, stage_index=stage_index, optimizer=optimizer, guard=guard)
            finished = plan.step + 1 == stage.num_steps
            if tracker is not None:
                tracker.log_step(plan.step, metrics)
            if finished or (plan.step + 1) % train.validate_every_steps == 0:
                self.validate(tracker, step=plan.step)
            if finished or (plan.step + 1) % train.checkpoint_every_steps == 0:
                state = TrainState(stage_index, plan.step + 1, {}, guard.state_dict())
                self.report(state, optimizer, metrics, tracker=tracker, stage_done=finished)

    def run_step(self, plan, *, stage_index: int, optimizer, guard: StepGuard) -> dict[str, float]:
        started = time.perf_counter()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), device=self.device)
        num_samples = num_tokens = 0
        accumulation = self.config.train.accumulation_steps
        for micro in range(accumulation):
            set_gradient_sync(self.model, enabled=micro == accumulation - 1)
            batch = to_device(
                load_micro_batch(plan.micro_batch(self.rank, micro), reader=self.reader),
                self.device,
            )
            generator = step_generator(
                seed=self.config.run.seed,
                stage_index=stage_index,
                step=plan.step,
                rank=self.rank,
                micro=micro,
            )
            with self.autocast():
                loss = flow_matching_step_loss(
                    self.model,
                    batch,
                    objective=self.config.train.objective,
                    convention=self.convention,
                    generator=generator,
                )
            (loss / accumulation).backward()
            loss_sum += loss.detach() / accumulation
            num_samples += batch["vae_latent"].shape[0]
            num_tokens += _tokens(batch)
        # FSDP has reduce-scattered (averaged) the gradients in backward; DDP averages here.
        self._average(
            [loss_sum] if is_sharded(self.model) else [*(p.grad for p in params), loss_sum]
        )
        grad_norm = float(
            full_tensor(
                torch.nn.utils.clip_grad_norm_(params, self.config.train.optimizer.max_grad_norm)
            )
        )
        verdict = guard.judge(float(loss_sum), grad_norm)
        stage = self.config.train.stages[stage_index]
        rate = set_learning_rate(
            optimizer, stage=stage, step=plan.step, base=self.config.train.optimizer.learning_rate
        )
        if verdict == "ok":
            optimizer.step()
        seconds = time.perf_counter() - started
        return {
            "loss": float(loss_sum),
            "learning_rate": rate,
            "grad_norm": grad_norm,
            "skipped": float(verdict != "ok"),
            "samples_per_second": num_samples * self.world / seconds,
            "tokens_per_second": num_tokens * self.world / seconds,
            "step_seconds": seconds,
            "peak_memory_mb": _peak_memory_mb(),
        }

    def _average(self, tensors: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def validate(self, tracker, *, step: int) -> None:
        """Rank 0 computes and logs; under FSDP every worker takes part in the forwards."""
        if tracker is None and not is_sharded(self.model):
            return
        objective, batch = self.config.train.objective, self.validation_batch
        with self.autocast():
            losses = validation_losses(
                self.model, batch, objective=objective, convention=self.convention
            )
            generated = validation_samples(
                self.model, batch, objective=objective, convention=self.convention
            )
        reshard(self.model)
        if tracker is not None:
            tracker.log_validation(step, losses, generated, batch)

    def autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=torch.bfloat16,
            enabled=compute_bf16(self.config.train.resources, self.device),
        )

    def report(self, state: TrainState, optimizer, metrics, *, tracker, stage_done: bool) -> None:
        """Checkpoint through Ray Train: every worker joins the gathers, rank 0 writes."""
        import ray.train

        stage_name = self.config.train.stages[state.stage_index].name
        reported = {**metrics, "stage_index": state.stage_index, "next_step": state.next_step}
        touched = touched_prefixes(self.model, self.config.train.stages, state.stage_index)
        weights = gather_parameters(self.model, touched, rank=self.rank)
        optimizer_state = gather_optimizer_state(self.model, optimizer)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                state = dataclasses.replace(state, optimizer_state=optimizer_state)
                save_train_state(Path(folder), weights=weights, state=state)
                if stage_done and tracker is not None:
                    tracker.log_checkpoint(Path(folder), stage_name)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(reported, checkpoint=checkpoint)


def compute_bf16(resources, device: torch.device) -> bool:
    """bf16 compute on GPU for "auto", wherever asked for "bf16"; plain fp32 otherwise.
    Master weights, gradients and AdamW states stay fp32 either way."""
    mode = resources.mixed_precision
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on `device` (lists and strings stay)."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def configure_stage(
    model: QwenFluxModel, stage: StageConfig
) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the stage's FLUX blocks, the connector and the encoder tail."""
    select_trainable_blocks(model.transformer, stage.flux_blocks)
    for module in (model.tail, model.connector):
        module.requires_grad_(True)
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def touched_prefixes(model: QwenFluxModel, stages, stage_index: int) -> tuple[str, ...]:
    """Parameter-name prefixes of everything trained in stages 0..stage_index."""
    blocks = sorted({block for stage in stages[: stage_index + 1] for block in stage.flux_blocks})
    flux = tuple(f"transformer.{block_prefix(model.transformer, block)}" for block in blocks)
    return ("tail.", "connector.", *flux)


def _count(parameters) -> int:
    return sum(param.numel() for _, param in parameters)


def _tokens(batch: dict[str, Any]) -> int:
    latent = batch["vae_latent"]
    image_tokens = latent.shape[0] * (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
    return image_tokens + int(batch["image_prompt_attention_mask"].sum())


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
