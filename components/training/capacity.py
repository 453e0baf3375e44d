"""Real-scale training planner: per-worker memory, FLOPs per step and run time of one stage.

Pure maths on parameter counts and shapes (no torch, no I/O); the inputs (FluxShape,
EncoderTailShape, TrainingSetup) live in `components/training/capacity_shapes.py`,
`components/training/capacity_measure.py` measures them on meta-device modules that
`pipelines/plan.py` builds from a preset. Inputs: the shapes, a TrainingSetup, one stage's
trainable FLUX block indices (0..56), optionally the parts of them that train (BlockShape.parts),
and its step count. Output: a StagePlan.

Precision policy (what the trainer does; every figure below assumes it):
- frozen FLUX weights stay fp32 as loaded (4 B/param): a block frozen now trains in a later
  stage, and FSDP2 cannot change a sharded unit's dtype between stages (bf16 storage of blocks
  no stage trains would save 12 of 57 blocks' worth; not done);
- trainable weights (FLUX blocks of the stage, connector, Qwen2-VL's last layer + final norm) are
  fp32 masters (4 B) with fp32 grads (4 B) and fp32 AdamW exp_avg + exp_avg_sq (8 B): 16 B/param;
- bf16 compute: DDP through autocast (which caches a bf16 copy of each trainable weight,
  2 B/param), FSDP2 through MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); fp32
  compute has no casts, and its activations are counted as the bf16 value counts at 4 B each
  (an upper bound: autocast's extra bf16 copies do not exist in fp32);
- FSDP2 wraps every FLUX block, the Qwen2-VL layer and the connector as one unit each, and the
  transformer's embedders + output head as one more, and shards everything over N workers
  (components/training/fsdp.py);
- the VAE, CLIP and Qwen2-VL layers 0..26 are not on training devices (the data pipeline caches
  them).

Activations (B micro-batch, L = image + text tokens, D FLUX width, b bytes per value). With
gradient checkpointing per FLUX block every block on the backward path keeps its input, B*L*D*b
(a double block keeps both streams, which together are L tokens), and during backward one block
is recomputed and holds its full saved activations, B*L*W*b with W the values it saves per token;
without it every block on the path holds B*L*W*b. The connector's gradient needs d loss /
d encoder_hidden_states, which enters block 0's text stream, so when the conditioning trains ALL
57 blocks are on the backward path, not only those from the first trainable block on. The
Qwen2-VL layer is never checkpointed: its saved values for every prompt it replays stay through
the step; the connector keeps its input, and the un-checkpointed output head adds a little.

FLOPs per sample (a multiply-add is 2 FLOPs; model FLOPs exclude the recompute, as MFU does):
- linear, per block: 2 * (image-token params * image tokens + text-token params * text tokens);
  adaLN modulation weights run once per sample and count zero (FLUX.1-dev: 113M of a double
  block's 340M); the embedders and output projection (< 0.02% of the total) are left out;
- attention, per block: 4 * L^2 * D forward (QK^T and AV), twice that backward;
- forward: every block; backward input-grad (activation gradients, = the forward's linear FLOPs
  plus 2x its attention): every block on the backward path; backward weight-grad (= the forward's
  linear FLOPs): trainable blocks only. A frozen block on the path so costs 4N per token instead of
  6N: its weights skip the weight-grad half of the matmul backward (a third of the 6N total);
- the Qwen2-VL layer and the connector count 6N per token (their input-grad is an upper bound:
  the layer's input is a cached frozen state) plus the layer's causal attention counted in full,
  per prompt (each prompt is a separate call).
Run time: model FLOPs per step / (num_workers * peak * MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from components.training.capacity_shapes import (
    BF16_BYTES,
    FP32_BYTES,
    GIB,
    OUTPUT_HEAD_SAVED_PER_DIM,
    SECONDS_PER_DAY,
    TRAINABLE_BYTES_PER_PARAM,
    BlockShape,
    EncoderTailShape,
    FluxShape,
    PartShape,
    TrainingSetup,
    backward_path,
    check_block_indices,
    decoder_layer_saved_values,
    flux_double_saved_values,
    flux_single_saved_values,
    trainable_flux_params,
)

__all__ = [
    "BF16_BYTES",
    "FP32_BYTES",
    "GIB",
    "SECONDS_PER_DAY",
    "TRAINABLE_BYTES_PER_PARAM",
    "BlockShape",
    "EncoderTailShape",
    "FlopsEstimate",
    "FluxShape",
    "PartShape",
    "MemoryEstimate",
    "StagePlan",
    "TrainingSetup",
    "activation_bytes",
    "backward_path",
    "check_block_indices",
    "ddp_memory",
    "decoder_layer_saved_values",
    "flux_double_saved_values",
    "flux_single_saved_values",
    "fsdp_memory",
    "plan_stage",
    "step_flops",
    "trainable_flux_params",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """Peak memory of one worker's device, in bytes, split by what holds it."""

    strategy: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    working: float
    """Transient copies of weights: autocast's bf16 casts (ddp), or all-gathered units and
    unsharded grads before reduce-scatter (fsdp)."""
    overhead: float

    @property
    def total(self) -> float:
        parts = (self.weights, self.grads, self.optimizer, self.activations, self.working)
        return sum(parts) + self.overhead

    def fits(self, capacity_bytes: float) -> bool:
        return self.total <= capacity_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class FlopsEstimate:
    """FLOPs of one optimizer step over all workers."""

    forward: float
    backward_input: float
    """Activation gradients (every block on the backward path, frozen or not)."""
    backward_weight: float
    """Weight gradients (trainable parameters only)."""
    recompute: float
    """Forward recomputed by gradient checkpointing (hardware FLOPs, not model FLOPs)."""

    @property
    def model(self) -> float:
        return self.forward + self.backward_input + self.backward_weight

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


@dataclass(frozen=True, kw_only=True, slots=True)
class StagePlan:
    """Everything the planner says about one stage."""

    trainable_blocks: tuple[int, ...]
    trainable_flux_params: int
    trainable_parts: tuple[str, ...] | None = None
    """The parts of those blocks that train (None: all of each block)."""
    tail_params: int
    """Qwen2-VL last layer + final norm."""
    connector_params: int
    t5_embedder_params: int = 0
    """The T5 branch's t5_embedder (0 on the Qwen2-VL branch)."""
    backward_blocks: tuple[int, int]
    """First and last FLUX block index on the backward path."""
    ddp: MemoryEstimate
    fsdp: MemoryEstimate
    flops: FlopsEstimate
    flux_tokens_per_step: int
    encoder_tokens_per_step: int
    step_seconds: float
    num_steps: int
    """Optimizer steps of the stage."""

    @property
    def trainable_params(self) -> int:
        return (
            self.trainable_flux_params
            + self.tail_params
            + self.connector_params
            + self.t5_embedder_params
        )

    @property
    def days(self) -> float:
        """Run time of the stage's num_steps at the assumed MFU."""
        return self.step_seconds * self.num_steps / SECONDS_PER_DAY

    def memory(self, strategy: str) -> MemoryEstimate:
        """The estimate of `strategy` ("ddp" or "fsdp")."""
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy {strategy!r}: must be 'ddp' or 'fsdp'")
        return self.ddp if strategy == "ddp" else self.fsdp


def activation_bytes(
    flux: FluxShape, tail: EncoderTailShape, setup: TrainingSetup, path: range
) -> float:
    """Saved activations of one micro-batch (see module doc)."""
    batch, length, value = setup.micro_batch, setup.flux_tokens, setup.compute_bytes
    saved = [flux.block(index).saved_values_per_token for index in path]
    if setup.gradient_checkpointing:
        flux_values = len(path) * flux.hidden_size + max(saved, default=0)
    else:
        flux_values = sum(saved)
    head = OUTPUT_HEAD_SAVED_PER_DIM * flux.hidden_size * setup.image_tokens
    connector_input = setup.text_tokens * tail.hidden_size
    tail_layer = tail.saved_values_per_token * setup.encoder_tokens
    return (flux_values * length + head + connector_input + tail_layer) * batch * value


def ddp_memory(
    flux: FluxShape,
    tail: EncoderTailShape,
    setup: TrainingSetup,
    *,
    trainable_flux: int,
    activations: float,
) -> MemoryEstimate:
    """DDP: every worker holds everything (gradient_as_bucket_view, so no second grad copy)."""
    trainable = trainable_flux + tail.trainable_params
    frozen = flux.num_params - trainable_flux
    return MemoryEstimate(
        strategy="ddp",
        weights=(frozen + trainable) * FP32_BYTES,
        grads=trainable * FP32_BYTES,
        optimizer=trainable * 2 * FP32_BYTES,
        activations=activations,
        working=trainable * BF16_BYTES if setup.compute_bf16 else 0.0,
        overhead=setup.overhead_gib * GIB,
    )


def fsdp_memory(
    flux: FluxShape,
    tail: EncoderTailShape,
    setup: TrainingSetup,
    *,
    indices: tuple[int, ...],
    activations: float,
    parts: tuple[str, ...] | None = None,
) -> MemoryEstimate:
    """FSDP2 over num_workers: shards of everything, plus the current and the prefetched unit
    gathered at the compute precision, one trainable unit's unsharded grad (bf16 + fp32 reduce
    buffer under bf16, fp32 alone under fp32; only the unit's trainable `parts`) and the root
    unit (embedders, output head) gathered for the whole step."""
    trainable_flux = trainable_flux_params(flux, indices, parts)
    trainable = trainable_flux + tail.trainable_params
    frozen = flux.num_params - trainable_flux
    shards = setup.num_workers
    largest_unit = max(
        flux.double_block.num_params,
        flux.single_block.num_params,
        tail.layer_params,
        tail.connector_params,
    )
    largest_trainable = max(
        max(flux.block(index).trained(parts).num_params for index in indices),
        tail.layer_params,
        tail.connector_params,
    )
    gathered = setup.compute_bytes
    unsharded_grad = (BF16_BYTES + FP32_BYTES) if setup.compute_bf16 else FP32_BYTES
    working = (
        2 * largest_unit * gathered
        + largest_trainable * unsharded_grad
        + flux.root_params * gathered
    )
    return MemoryEstimate(
        strategy="fsdp",
        weights=(frozen + trainable) * FP32_BYTES / shards,
        grads=trainable * FP32_BYTES / shards,
        optimizer=trainable * 2 * FP32_BYTES / shards,
        activations=activations,
        working=working,
        overhead=setup.overhead_gib * GIB,
    )


def step_flops(
    flux: FluxShape,
    tail: EncoderTailShape,
    setup: TrainingSetup,
    *,
    indices: tuple[int, ...],
    path: range,
    parts: tuple[str, ...] | None = None,
) -> FlopsEstimate:
    """FLOPs of one optimizer step (global batch), split as the module doc says; the weight
    grads of a trainable block cover only its trainable `parts` (None: all of it)."""
    length = setup.flux_tokens
    attention = 4 * length**2 * flux.hidden_size

    def linear(index: int, trained: tuple[str, ...] | None = None) -> float:
        block = flux.block(index) if trained is None else flux.block(index).trained(trained)
        return 2 * (
            block.image_token_params * setup.image_tokens
            + block.text_token_params * setup.text_tokens
        )

    forward = sum(linear(index) + attention for index in range(flux.num_blocks))
    backward_input = sum(linear(index) + 2 * attention for index in path)
    backward_weight = sum(linear(index, parts) for index in indices)
    recompute = (
        sum(linear(index) + attention for index in path) if setup.gradient_checkpointing else 0
    )

    tail_linear = 2 * (tail.layer_params + tail.norm_params) * setup.encoder_tokens
    tail_attention = sum(4 * tokens**2 for tokens in setup.encoder_prompt_tokens)
    tail_attention *= tail.attention_width
    connector = 2 * tail.connector_params * setup.text_tokens
    # The t5_embedder's input is a cached frozen state: no input grad.
    t5 = 2 * tail.t5_embedder_params * setup.t5_tokens
    forward += tail_linear + tail_attention + connector + t5
    backward_input += tail_linear + 2 * tail_attention + connector
    backward_weight += tail_linear + connector + t5
    samples = setup.global_batch
    return FlopsEstimate(
        forward=forward * samples,
        backward_input=backward_input * samples,
        backward_weight=backward_weight * samples,
        recompute=recompute * samples,
    )


def plan_stage(
    flux: FluxShape,
    tail: EncoderTailShape,
    setup: TrainingSetup,
    indices: tuple[int, ...],
    *,
    num_steps: int,
    trains_conditioning: bool = True,
    parts: tuple[str, ...] | None = None,
) -> StagePlan:
    """Plan one stage of `num_steps` optimizer steps that trains `parts` (None: all; the names of
    the flux shape's BlockShape.parts) of FLUX blocks `indices`, plus the connector and encoder
    tail when `trains_conditioning`, as every stage of the report does."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    indices = tuple(indices)
    path = backward_path(flux, indices, trains_conditioning=trains_conditioning)
    trainable_flux = trainable_flux_params(flux, indices, parts)
    conditioning = tail if trains_conditioning else _frozen_tail(tail)
    activations = activation_bytes(flux, conditioning, setup, path)
    flops = step_flops(flux, conditioning, setup, indices=indices, path=path, parts=parts)
    step_seconds = flops.model / (setup.num_workers * setup.peak_tflops * 1e12 * setup.mfu)
    return StagePlan(
        trainable_blocks=indices,
        trainable_parts=parts,
        trainable_flux_params=trainable_flux,
        tail_params=conditioning.layer_params + conditioning.norm_params,
        connector_params=conditioning.connector_params,
        t5_embedder_params=conditioning.t5_embedder_params,
        backward_blocks=(path.start, path.stop - 1),
        ddp=ddp_memory(
            flux, conditioning, setup, trainable_flux=trainable_flux, activations=activations
        ),
        fsdp=fsdp_memory(
            flux, conditioning, setup, indices=indices, activations=activations, parts=parts
        ),
        flops=flops,
        flux_tokens_per_step=setup.global_batch * setup.flux_tokens,
        encoder_tokens_per_step=setup.global_batch * setup.encoder_tokens,
        step_seconds=step_seconds,
        num_steps=num_steps,
    )


def _frozen_tail(tail: EncoderTailShape) -> EncoderTailShape:
    # A frozen conditioning path would be cached like the prefix: nothing of it on the device.
    return EncoderTailShape(
        hidden_size=0,
        attention_width=0,
        layer_params=0,
        norm_params=0,
        saved_values_per_token=0,
        connector_width=0,
    )
