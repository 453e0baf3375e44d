"""The one training loop: the three progressive stages, step by step, on one worker of N.

`TrainingLoop.run` walks the stages from a resume point. A step draws its micro-batches from the
step plan (components/training/loader.py), accumulates their gradients, averages them across
workers (FSDP reduce-scatters in backward; otherwise `Collectives.average`), clips, asks the
guard, sets the trapezoid's learning rate and steps AdamW on the stage's trainable set: its FLUX
blocks + the connector + Qwen2-VL's last layer. Validation and checkpoints come at their
cadence and at each stage's end.

Framework-free: the collectives, the metric sink (rank 0's MLflow writer, or None) and the
checkpoint publisher (Ray Train's report, or a plain folder copy) are passed in. Stage k+1
continues from stage k's weights in memory; a resume restores the weights every stage so far
touched, the optimizer, the guard, the stage index and the next step. All randomness of a step
is a function of (seed, stage, step, rank, micro-batch) and the batch plan of step s is a
function of s, so resumed steps are the steps an uninterrupted run would take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from components.training.checkpoint_state import BatchLayout, TrainState
from components.training.distributed_checkpoint import (
    CheckpointWriter,
    checkpoint_entries,
    restore_train_state,
)
from components.training.fsdp import full_tensor, is_sharded, reshard, set_gradient_sync
from components.training.loader import (
    BucketIndex,
    LoaderConfig,
    ShardReader,
    StepPlan,
    load_micro_batch,
    plan_steps,
)
from components.training.loop_config import LoopConfig
from components.training.objective import (
    LatentConvention,
    QwenFluxModel,
    flow_matching_step_loss,
    step_generator,
    validation_losses,
    validation_samples,
)
from components.training.optimizer import StepGuard, build_optimizer, set_learning_rate
from components.training.stages import StageConfig
from model.ema import WeightAverage
from model.flux_stages import block_prefix, select_trainable_blocks


@dataclass(frozen=True, slots=True)
class Collectives:
    """This worker's place among `world` workers, and the gradient average across them."""

    rank: int = 0
    world: int = 1

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the workers (one flat all-reduce)."""
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


class MetricSink(Protocol):
    """Where rank 0's metrics go (pipelines/train_tracking.py writes them to MLflow)."""

    def start_stage(self, stage_index: int, stage: StageConfig, *, num_trainable: int) -> None: ...

    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_validation(
        self, step: int, losses: dict[float, float], generated_raw: torch.Tensor, batch
    ) -> None: ...

    def log_checkpoint(self, state: TrainState, stage_name: str) -> None: ...


PublishFn = Callable[[Path, dict[str, float]], None]
"""publish(folder, metrics): hand a written checkpoint on. Every worker calls it once per
checkpoint with the folder of its own pieces (rank 0's also holds state.json and DCP's index),
deleted after the call; together the folders are the checkpoint."""


@dataclass(frozen=True, slots=True)
class LoopData:
    """The training rows (an index without the held-out rows) and the fixed validation batch."""

    index: BucketIndex
    validation_batch: dict[str, Any]

    @classmethod
    def from_dataset(cls, root: Path, *, num_validation_samples: int, device) -> LoopData:
        """The dataset at `root` split by `hold_out`, the validation batch on `device`."""
        index, validation_refs = hold_out(BucketIndex.from_dataset(root), num_validation_samples)
        batch = load_micro_batch(validation_refs, reader=ShardReader())
        return cls(index, to_device(batch, torch.device(device)))


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


class TrainingLoop:
    """Runs the stages on one worker; see the module docstring."""

    def __init__(
        self,
        model: QwenFluxModel,
        *,
        config: LoopConfig,
        convention: LatentConvention,
        data: LoopData,
        collectives: Collectives = Collectives(),
    ) -> None:
        self.model = model
        self.config = config
        self.convention = convention
        self.data = data
        self.collectives = collectives
        self.device = data.validation_batch["vae_latent"].device
        self.reader = ShardReader()
        self.layout = BatchLayout(collectives.world, config.accumulation_steps)
        """The run's micro-batch slots (a resume keeps its checkpoint's)."""
        self.writer = CheckpointWriter(rank=collectives.rank, asynchronous=config.async_checkpoints)
        self.average = WeightAverage(config.ema.decay) if config.ema.enabled else None
        self.losses: list[float] = []
        """Every applied or skipped step's loss, in order (this run only)."""
        self._restored: tuple[int, torch.optim.Optimizer, StepGuard] | None = None
        self._tracked: list[tuple[str, torch.nn.Parameter]] = []
        """The EMA's (name, parameter) pairs of the current stage (set at its start)."""

    def restore(self, state: TrainState) -> None:
        """Load a checkpoint (components/training/checkpoint_state.read_train_state) into the
        model, the resumed stage's AdamW and the EMA, and take its batch layout; `run(state)`
        goes on from there. Every worker calls it while the folder exists."""
        if state.layout is not None:
            self.layout = state.layout
        self.layout.slots_of(self.collectives.rank, self.collectives.world)  # splits evenly?
        parameters = configure_stage(self.model, self.config.stages[state.stage_index])
        optimizer = build_optimizer(parameters, self.config.optimizer)
        if self.average is not None:
            self.average.track(self._touched(state.stage_index))
        shadows = self.average.shadows if self.average is not None else None
        restore_train_state(state, self.model, optimizer, ema=shadows)
        guard = StepGuard(self.config.guard)
        guard.load_state_dict(state.guard_state)
        self._restored = (state.stage_index, optimizer, guard)

    def run(
        self,
        resume: TrainState | None,
        *,
        sink: MetricSink | None,
        publish: PublishFn,
    ) -> list[float]:
        """Train from `resume` (None = the start) to the last stage's last step; returns the
        per-step losses of this run."""
        if resume is not None and self._restored is None:
            self.restore(resume)
        start = resume.stage_index if resume else 0
        for stage_index in range(start, len(self.config.stages)):
            own = resume if resume and resume.stage_index == stage_index else None
            self.run_stage(stage_index, resume=own, sink=sink, publish=publish)
        self.writer.finish(publish)
        return self.losses

    def run_stage(
        self, stage_index: int, *, resume: TrainState | None, sink, publish: PublishFn
    ) -> None:
        config = self.config
        stage = config.stages[stage_index]
        if resume is not None and self._restored is not None:
            _, optimizer, guard = self._restored
            self._restored = None
        else:
            optimizer = build_optimizer(configure_stage(self.model, stage), config.optimizer)
            guard = StepGuard(config.guard)
        if self.average is not None:
            self.average.track(self._touched(stage_index))
            parameters = dict(self.model.named_parameters())
            self._tracked = [(name, parameters[name]) for name in self.average.shadows]
        loader = LoaderConfig(
            micro_batch_size=config.micro_batch_size,
            accumulation_steps=self.layout.accumulation_steps,
            seed=config.seed + stage_index,
        )
        plans = plan_steps(
            self.data.index,
            loader,
            num_steps=stage.num_steps,
            num_workers=self.layout.workers,
            start_step=resume.next_step if resume else 0,
        )
        if sink is not None:
            trained = [p for group in optimizer.param_groups for p in group["params"]]
            sink.start_stage(stage_index, stage, num_trainable=sum(p.numel() for p in trained))
        for plan in plans:
            metrics = self.run_step(plan, stage_index=stage_index, optimizer=optimizer, guard=guard)
            finished = plan.step + 1 == stage.num_steps
            if sink is not None:
                sink.log_step(plan.step, metrics)
            self.writer.poll(publish)
            if finished or (plan.step + 1) % config.validate_every_steps == 0:
                self.validate(sink, step=plan.step)
            if finished or (plan.step + 1) % config.checkpoint_every_steps == 0:
                state = TrainState(stage_index, plan.step + 1, guard.state_dict(), self.layout)
                self.checkpoint(state, optimizer, metrics, sink=sink, publish=publish)
        self.writer.finish(publish)

    def run_step(
        self, plan: StepPlan, *, stage_index: int, optimizer, guard: StepGuard
    ) -> dict[str, float]:
        """One optimizer step: accumulate this worker's slots, average, clip, judge, schedule,
        apply, average the weights (EMA)."""
        started = time.perf_counter()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), device=self.device)
        num_samples = num_tokens = 0
        slots = self.layout.slots_of(self.collectives.rank, self.collectives.world)
        for index, (virtual_rank, micro) in enumerate(slots):
            set_gradient_sync(self.model, enabled=index == len(slots) - 1)
            batch = to_device(
                load_micro_batch(plan.micro_batch(virtual_rank, micro), reader=self.reader),
                self.device,
            )
            generator = step_generator(
                seed=self.config.seed,
                stage_index=stage_index,
                step=plan.step,
                rank=virtual_rank,
                micro=micro,
            )
            with self.autocast():
                loss = flow_matching_step_loss(
                    self.model,
                    batch,
                    objective=self.config.objective,
                    convention=self.convention,
                    generator=generator,
                )
            (loss / len(slots)).backward()
            loss_sum += loss.detach() / len(slots)
            num_samples += batch["vae_latent"].shape[0]
            num_tokens += _tokens(batch)
        # FSDP has reduce-scattered (averaged) the gradients in backward; DDP averages here.
        self.collectives.average(
            [loss_sum] if is_sharded(self.model) else [*(p.grad for p in params), loss_sum]
        )
        grad_norm = float(
            full_tensor(torch.nn.utils.clip_grad_norm_(params, self.config.optimizer.max_grad_norm))
        )
        verdict = guard.judge(float(loss_sum), grad_norm)
        rate = set_learning_rate(
            optimizer,
            stage=self.config.stages[stage_index],
            step=plan.step,
            base=self.config.optimizer.learning_rate,
        )
        if verdict == "ok":
            optimizer.step()
            self._average_weights(stage_index, plan.step)
        seconds = time.perf_counter() - started
        self.losses.append(float(loss_sum))
        world = self.collectives.world
        return {
            "loss": float(loss_sum),
            "learning_rate": rate,
            "grad_norm": grad_norm,
            "skipped": float(verdict != "ok"),
            "samples_per_second": num_samples * world / seconds,
            "tokens_per_second": num_tokens * world / seconds,
            "step_seconds": seconds,
            "peak_memory_mb": _peak_memory_mb(),
        }

    def _average_weights(self, stage_index: int, step: int) -> None:
        """The EMA step after an applied optimizer step (shadows follow the weights until
        ema.start_step, counted over all stages)."""
        if self.average is None:
            return
        run_step = sum(stage.num_steps for stage in self.config.stages[:stage_index]) + step
        if run_step < self.config.ema.start_step:
            self.average.reset(self._tracked)
        else:
            self.average.update(self._tracked)

    def validate(self, sink: MetricSink | None, *, step: int) -> None:
        """Rank 0 computes and logs; under FSDP every worker takes part in the forwards. On the
        EMA weights when ema.validate_on says so."""
        if sink is None and not is_sharded(self.model):
            return
        objective, batch = self.config.objective, self.data.validation_batch
        on_ema = self.average is not None and self.config.ema.validate_on == "ema"
        with self.average.applied(self.model) if on_ema else contextlib.nullcontext():
            with self.autocast():
                losses = validation_losses(
                    self.model, batch, objective=objective, convention=self.convention
                )
                generated = validation_samples(
                    self.model, batch, objective=objective, convention=self.convention
                )
            reshard(self.model)
        if sink is not None:
            sink.log_validation(step, losses, generated, batch)

    def checkpoint(
        self, state: TrainState, optimizer, metrics, *, sink, publish: PublishFn
    ) -> None:
        """Every worker writes its own pieces (DCP) and publishes its folder."""
        stages = self.config.stages
        reported = {**metrics, "stage_index": state.stage_index, "next_step": state.next_step}
        reshard(self.model)
        shadows = self.average.shadows if self.average is not None else None
        entries = checkpoint_entries(
            self.model, optimizer, self._touched_prefixes(state.stage_index), ema=shadows
        )
        self.writer.save(state, entries, reported, publish=publish)
        stage_done = state.next_step == stages[state.stage_index].num_steps
        if stage_done and sink is not None:
            sink.log_checkpoint(state, stages[state.stage_index].name)

    def _touched_prefixes(self, stage_index: int) -> tuple[str, ...]:
        return touched_prefixes(self.model, self.config.stages, stage_index)

    def _touched(self, stage_index: int) -> list[tuple[str, torch.nn.Parameter]]:
        prefixes = self._touched_prefixes(stage_index)
        return [(n, p) for n, p in self.model.named_parameters() if n.startswith(prefixes)]

    def autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.compute_bf16
        )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch on `device` (lists and strings stay)."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def configure_stage(
    model: QwenFluxModel, stage: StageConfig
) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the stage's FLUX blocks (their `flux_parts`), the connector, the
    encoder tail and, on the T5 branch, the t5_embedder."""
    select_trainable_blocks(model.transformer, stage.flux_blocks, stage.flux_parts)
    for module in conditioning_modules(model):
        module.requires_grad_(True)
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def touched_prefixes(model: QwenFluxModel, stages, stage_index: int) -> tuple[str, ...]:
    """Parameter-name prefixes of everything trained in stages 0..stage_index."""
    blocks = sorted({block for stage in stages[: stage_index + 1] for block in stage.flux_blocks})
    flux = tuple(f"transformer.{block_prefix(model.transformer, block)}" for block in blocks)
    t5 = ("t5_embedder.",) if model.t5_embedder is not None else ()
    return ("tail.", "connector.", *t5, *flux)


def conditioning_modules(model: QwenFluxModel) -> list[torch.nn.Module]:
    """What trains in every stage: the encoder tail, the connector, the T5 branch's embedder."""
    modules = [model.tail, model.connector]
    return modules if model.t5_embedder is None else [*modules, model.t5_embedder]


def _tokens(batch: dict[str, Any]) -> int:
    latent = batch["vae_latent"]
    image_tokens = latent.shape[0] * (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
    return image_tokens + int(batch["image_prompt_attention_mask"].sum())


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
