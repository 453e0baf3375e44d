"""Real-scale training planner: per-GPU memory, FLOPs per step and run time of one stage.

Pure maths on parameter counts and shapes (no torch, no I/O); `pipelines/plan.py` measures the
shapes from the public configs on the meta device. Inputs: a FluxShape, an EncoderTailShape, a
TrainingSetup and one stage's trainable FLUX block indices (0..56). Output: a StagePlan.

Precision policy (what the trainer does; every figure below assumes it):
- frozen FLUX weights stay fp32 as loaded (4 B/param): a block frozen now trains in a later
  stage, and FSDP2 cannot change a sharded unit's dtype between stages (bf16 storage of blocks
  no stage trains would save 12 of 57 blocks' worth; not done);
- trainable weights (FLUX blocks of the stage, connector, Qwen2-VL's last layer + final norm) are
  fp32 masters (4 B) with fp32 grads (4 B) and fp32 AdamW exp_avg + exp_avg_sq (8 B): 16 B/param;
- compute is bf16: DDP through autocast (which caches a bf16 copy of each trainable weight,
  2 B/param), FSDP2 through MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32);
- FSDP2 wraps every FLUX block, the Qwen2-VL layer and the connector as one unit each, and the
  transformer's embedders + output head as one more, and shards everything over N
  (components/training/fsdp.py);
- the VAE, CLIP and Qwen2-VL layers 0..26 are not on training GPUs (the data pipeline caches them).

Activations, with gradient checkpointing per block (B micro-batch, L = image + text tokens, D FLUX
width): every block on the backward path keeps its input, B*L*D*2 bytes (a double block keeps both
streams, which together are L tokens); during backward one block is recomputed and holds its full
saved activations, B*L*W*2 bytes with W the values it saves per token (counted below). The
connector's gradient needs d loss / d encoder_hidden_states, which enters block 0's text stream,
so when the conditioning trains ALL 57 blocks are on the backward path, not only those from the
first trainable block on. The un-checkpointed output head and the tail's input add a little.

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
  the layer's input is a cached frozen state) plus the layer's causal attention counted in full.
Run time: model FLOPs per step / (num_gpus * peak * MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

BF16_BYTES = 2
FP32_BYTES = 4
TRAINABLE_BYTES_PER_PARAM = FP32_BYTES * 4
"""fp32 master weight + fp32 grad + two fp32 AdamW moments."""
GIB = 1024**3
SECONDS_PER_DAY = 86_400

# Values saved per token by one block's forward under bf16 autocast, counted from diffusers
# 0.42.1's FluxTransformerBlock / FluxSingleTransformerBlock (fp32 LayerNorm/RMSNorm outputs count
# twice; each Linear saves its own bf16 cast of a fp32 input). In units of the FLUX width D.
DOUBLE_BLOCK_SAVED_PER_DIM = 35
SINGLE_BLOCK_SAVED_PER_DIM = 30
OUTPUT_HEAD_SAVED_PER_DIM = 5
"""norm_out (fp32 LayerNorm in/out) + proj_out's bf16 input, on image tokens, not checkpointed."""


def flux_double_saved_values(hidden_size: int) -> int:
    """Values a FLUX double-stream block saves per token (each token is in one stream)."""
    return DOUBLE_BLOCK_SAVED_PER_DIM * hidden_size


def flux_single_saved_values(hidden_size: int) -> int:
    """Values a FLUX single-stream block saves per token."""
    return SINGLE_BLOCK_SAVED_PER_DIM * hidden_size


def decoder_layer_saved_values(hidden_size: int, intermediate_size: int) -> int:
    """Values a Qwen2 decoder layer saves per token: two fp32 RMSNorms, q/k/v with rope,
    attention output (13 x hidden) and the SwiGLU gate, up, activation and product (4 x MLP)."""
    return 13 * hidden_size + 4 * intermediate_size


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockShape:
    """One FLUX block's parameters, split by how often they run, and its saved activations."""

    num_params: int
    """All parameters of the block."""
    image_token_params: int
    """Parameters applied to every image token (the image stream, or the whole single block)."""
    text_token_params: int
    """Parameters applied to every text token (the text stream, or the whole single block)."""
    saved_values_per_token: int
    """Activation values the forward saves for backward, per token."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FluxShape:
    """The FLUX transformer: block shapes and counts (blocks are double first, then single)."""

    hidden_size: int
    """Model width D (heads x head dim)."""
    num_double_blocks: int
    num_single_blocks: int
    double_block: BlockShape
    single_block: BlockShape
    num_params: int
    """All parameters, blocks plus embedders, output head and modulation of the output norm."""

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + self.num_single_blocks

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks (one FSDP unit kept gathered through the step)."""
        return self.num_params - sum(self.block(i).num_params for i in range(self.num_blocks))

    def block(self, index: int) -> BlockShape:
        """Shape of block `index` (0..num_blocks-1)."""
        return self.double_block if index < self.num_double_blocks else self.single_block


@dataclass(frozen=True, kw_only=True, slots=True)
class EncoderTailShape:
    """What trains on the encoder side: Qwen2-VL's last decoder layer + final norm, and the
    connector Linear (encoder hidden size -> FLUX joint_attention_dim)."""

    hidden_size: int
    """Encoder hidden size (3584 for Qwen2-VL-7B)."""
    attention_width: int
    """Query width of the layer's attention (heads x head dim)."""
    layer_params: int
    """Parameters of the last decoder layer."""
    norm_params: int
    """Parameters of the final norm."""
    saved_values_per_token: int
    """Activation values the layer saves for backward, per token."""
    connector_width: int
    """Output features of the connector Linear (FLUX's joint_attention_dim, 4096)."""

    @property
    def connector_params(self) -> int:
        """Connector Linear weight + bias."""
        return self.hidden_size * self.connector_width + self.connector_width

    @property
    def trainable_params(self) -> int:
        return self.layer_params + self.norm_params + self.connector_params


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingSetup:
    """The run being planned; defaults are the report's reference run (8x A100-80GB)."""

    num_gpus: int = 8
    """Data-parallel GPUs."""
    global_batch: int = 128
    """Samples per optimizer step over all GPUs and accumulation steps."""
    grad_accum: int = 2
    """Micro-batches per optimizer step on each GPU."""
    image_tokens: int = 4096
    """FLUX image tokens per sample: a 1024x1024 bucket -> 128x128 latents -> 64x64 packed 2x2."""
    text_tokens: int = 512
    """FLUX text tokens per sample: the 512 image tokens of the reference-image prompt."""
    encoder_tokens: int = 538
    """Tokens the Qwen2-VL layer runs over: 512 image tokens + about 26 of chat template and
    instruction ("Describe this image.")."""
    num_steps: int = 100_000
    """Optimizer steps of the run (the report's 100K)."""
    mfu: float = 0.35
    """Model FLOPs utilisation assumed for the run time."""
    peak_tflops: float = 312.0
    """Dense bf16 peak per GPU in TFLOP/s (A100: 312)."""
    gpu_memory_gib: float = 80.0
    """Memory per GPU the verdict compares against."""
    overhead_gib: float = 4.0
    """CUDA context, NCCL buffers, allocator fragmentation and transient backward buffers."""

    def __post_init__(self) -> None:
        for name in ("num_gpus", "global_batch", "grad_accum", "image_tokens", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.text_tokens < 0 or self.encoder_tokens < 0:
            raise ValueError("text_tokens and encoder_tokens must be >= 0")
        if self.global_batch % (self.num_gpus * self.grad_accum):
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of num_gpus x grad_accum "
                f"= {self.num_gpus * self.grad_accum}"
            )
        if not 0 < self.mfu <= 1:
            raise ValueError("mfu must be in (0, 1]")
        if self.peak_tflops <= 0 or self.gpu_memory_gib <= 0 or self.overhead_gib < 0:
            raise ValueError("peak_tflops and gpu_memory_gib must be > 0, overhead_gib >= 0")

    @property
    def micro_batch(self) -> int:
        """Samples per GPU per forward/backward."""
        return self.global_batch // (self.num_gpus * self.grad_accum)

    @property
    def flux_tokens(self) -> int:
        """FLUX sequence length L per sample (image + text)."""
        return self.image_tokens + self.text_tokens


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """Peak memory of one GPU, in bytes, split by what holds it."""

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
    """FLOPs of one optimizer step over all GPUs."""

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
    tail_params: int
    """Qwen2-VL last layer + final norm."""
    connector_params: int
    backward_blocks: tuple[int, int]
    """First and last FLUX block index on the backward path."""
    ddp: MemoryEstimate
    fsdp: MemoryEstimate
    flops: FlopsEstimate
    flux_tokens_per_step: int
    encoder_tokens_per_step: int
    step_seconds: float
    days: float

    @property
    def trainable_params(self) -> int:
        return self.trainable_flux_params + self.tail_params + self.connector_params


def check_block_indices(flux: FluxShape, indices: tuple[int, ...]) -> None:
    """Raise ValueError unless `indices` are distinct FLUX block indices in 0..num_blocks-1."""
    if not indices:
        raise ValueError("a stage needs at least one trainable FLUX block")
    for index in indices:
        if not 0 <= index < flux.num_blocks:
            raise ValueError(f"FLUX block index {index} outside 0..{flux.num_blocks - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate FLUX block index in {indices}")


def trainable_flux_params(flux: FluxShape, indices: tuple[int, ...]) -> int:
    """Parameters of FLUX blocks `indices`."""
    check_block_indices(flux, indices)
    return sum(flux.block(index).num_params for index in indices)


def backward_path(flux: FluxShape, indices: tuple[int, ...], *, trains_conditioning: bool) -> range:
    """FLUX blocks whose activation gradients backward computes: from block 0 when the
    conditioning (connector, encoder tail) trains, else from the first trainable block."""
    check_block_indices(flux, indices)
    return range(0 if trains_conditioning else min(indices), flux.num_blocks)


def activation_bytes(
    flux: FluxShape, tail: EncoderTailShape, setup: TrainingSetup, path: range
) -> float:
    """Saved activations of one micro-batch with per-block checkpointing (see module doc)."""
    batch, length, width = setup.micro_batch, setup.flux_tokens, flux.hidden_size
    stored = len(path) * batch * length * width * BF16_BYTES
    head = OUTPUT_HEAD_SAVED_PER_DIM * width * batch * setup.image_tokens * BF16_BYTES
    # The tail's checkpointed input and the connector's input (its weight needs it).
    conditioning = (
        batch * (setup.encoder_tokens + setup.text_tokens) * tail.hidden_size * BF16_BYTES
    )
    flux_recompute = (
        max((flux.block(index).saved_values_per_token for index in path), default=0)
        * batch
        * length
        * BF16_BYTES
    )
    tail_recompute = tail.saved_values_per_token * batch * setup.encoder_tokens * BF16_BYTES
    return stored + head + conditioning + max(flux_recompute, tail_recompute)


def ddp_memory(
    flux: FluxShape,
    tail: EncoderTailShape,
    setup: TrainingSetup,
    *,
    trainable_flux: int,
    activations: float,
) -> MemoryEstimate:
    """DDP: every GPU holds everything (gradient_as_bucket_view, so no second grad copy)."""
    trainable = trainable_flux + tail.trainable_params
    frozen = flux.num_params - trainable_flux
    return MemoryEstimate(
        strategy="ddp",
        weights=(frozen + trainable) * FP32_BYTES,
        grads=trainable * FP32_BYTES,
        optimizer=trainable * 2 * FP32_BYTES,
        activations=activations,
        working=trainable * BF16_BYTES,
        overhead=setup.overhead_gib * GIB,
    )


def fsdp_memory(
    flux: FluxShape,
    tail: EncoderTailShape,
    setup: TrainingSetup,
    *,
    indices: tuple[int, ...],
    activations: float,
) -> MemoryEstimate:
    """FSDP2 over num_gpus: shards of everything, plus the current and the prefetched unit
    gathered in bf16, one trainable unit's unsharded grad (bf16 + fp32 reduce buffer) and the
    root unit (embedders, output head) gathered for the whole step."""
    trainable_flux = trainable_flux_params(flux, indices)
    trainable = trainable_flux + tail.trainable_params
    frozen = flux.num_params - trainable_flux
    shards = setup.num_gpus
    largest_unit = max(
        flux.double_block.num_params,
        flux.single_block.num_params,
        tail.layer_params,
        tail.connector_params,
    )
    largest_trainable = max(
        max(flux.block(index).num_params for index in indices),
        tail.layer_params,
        tail.connector_params,
    )
    working = (
        2 * largest_unit * BF16_BYTES
        + largest_trainable * (BF16_BYTES + FP32_BYTES)
        + flux.root_params * BF16_BYTES
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
) -> FlopsEstimate:
    """FLOPs of one optimizer step (global batch), split as the module doc says."""
    length = setup.flux_tokens
    attention = 4 * length**2 * flux.hidden_size

    def linear(index: int) -> float:
        block = flux.block(index)
        return 2 * (
            block.image_token_params * setup.image_tokens
            + block.text_token_params * setup.text_tokens
        )

    forward = sum(linear(index) + attention for index in range(flux.num_blocks))
    backward_input = sum(linear(index) + 2 * attention for index in path)
    backward_weight = sum(linear(index) for index in indices)
    recompute = sum(linear(index) + attention for index in path)

    tail_linear = 2 * (tail.layer_params + tail.norm_params) * setup.encoder_tokens
    tail_attention = 4 * setup.encoder_tokens**2 * tail.attention_width
    connector = 2 * tail.connector_params * setup.text_tokens
    forward += tail_linear + tail_attention + connector
    backward_input += tail_linear + 2 * tail_attention + connector
    backward_weight += tail_linear + connector
    recompute += tail_linear + tail_attention
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
    trains_conditioning: bool = True,
) -> StagePlan:
    """Plan one stage that trains FLUX blocks `indices` (plus the connector and encoder tail
    when `trains_conditioning`, as every stage of the report does)."""
    indices = tuple(indices)
    path = backward_path(flux, indices, trains_conditioning=trains_conditioning)
    trainable_flux = trainable_flux_params(flux, indices)
    conditioning = tail if trains_conditioning else _frozen_tail(tail)
    activations = activation_bytes(flux, conditioning, setup, path)
    flops = step_flops(flux, conditioning, setup, indices=indices, path=path)
    step_seconds = flops.model / (setup.num_gpus * setup.peak_tflops * 1e12 * setup.mfu)
    return StagePlan(
        trainable_blocks=indices,
        trainable_flux_params=trainable_flux,
        tail_params=conditioning.layer_params + conditioning.norm_params,
        connector_params=conditioning.connector_params,
        backward_blocks=(path.start, path.stop - 1),
        ddp=ddp_memory(
            flux, conditioning, setup, trainable_flux=trainable_flux, activations=activations
        ),
        fsdp=fsdp_memory(flux, conditioning, setup, indices=indices, activations=activations),
        flops=flops,
        flux_tokens_per_step=setup.global_batch * setup.flux_tokens,
        encoder_tokens_per_step=setup.global_batch * setup.encoder_tokens,
        step_seconds=step_seconds,
        days=step_seconds * setup.num_steps / SECONDS_PER_DAY,
    )


def _frozen_tail(tail: EncoderTailShape) -> EncoderTailShape:
    # A frozen conditioning path would be cached like the prefix: nothing of it on the GPU.
    return EncoderTailShape(
        hidden_size=0,
        attention_width=0,
        layer_params=0,
        norm_params=0,
        saved_values_per_token=0,
        connector_width=0,
    )
