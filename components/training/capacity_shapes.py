"""What the training planner plans: model shapes, the run's setup, and block index checks.

Pure data, no torch and no I/O. `components/training/capacity_measure.py` measures FluxShape and
EncoderTailShape on modules that `pipelines/plan.py` builds on the meta device from the
checkpoints' config.json files; plan.py also builds a TrainingSetup from a preset;
`components/training/capacity.py` turns them into memory, FLOPs and time per stage.

Saved-activation counts per token are counted from diffusers 0.42.1's FluxTransformerBlock /
FluxSingleTransformerBlock and transformers 5.24's Qwen2VLDecoderLayer under bf16 autocast (fp32
LayerNorm/RMSNorm outputs count twice; each Linear saves its own bf16 cast of a fp32 input).
"""

from __future__ import annotations

from dataclasses import dataclass

BF16_BYTES = 2
FP32_BYTES = 4
TRAINABLE_BYTES_PER_PARAM = FP32_BYTES * 4
"""fp32 master weight + fp32 grad + two fp32 AdamW moments."""
GIB = 1024**3
SECONDS_PER_DAY = 86_400

# Values saved per token by one block's forward under bf16 autocast, in units of the FLUX width D.
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
class PartShape:
    """Parameters of one part of a FLUX block (attention, mlp, ...: model/flux_stages.py's
    FLUX_PARTS), split like the block's own."""

    name: str
    num_params: int
    image_token_params: int
    text_token_params: int


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
    parts: tuple[PartShape, ...] = ()
    """The block split by part (empty when not measured: only whole blocks can be planned)."""

    def trained(self, parts: tuple[str, ...] | None) -> PartShape:
        """What of the block trains when `parts` of it do (None: the whole block)."""
        if parts is None:
            return PartShape(
                name="all",
                num_params=self.num_params,
                image_token_params=self.image_token_params,
                text_token_params=self.text_token_params,
            )
        known = {part.name: part for part in self.parts}
        missing = sorted(set(parts) - set(known))
        if missing:
            raise ValueError(f"block shape has no part {missing[0]!r} (parts: {sorted(known)})")
        chosen = [known[name] for name in parts]
        return PartShape(
            name="+".join(parts),
            num_params=sum(part.num_params for part in chosen),
            image_token_params=sum(part.image_token_params for part in chosen),
            text_token_params=sum(part.text_token_params for part in chosen),
        )


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
    t5_embedder_params: int = 0
    """The T5 text branch's t5_embedder (T5 width x FLUX inner width + bias; 0 on the Qwen2-VL
    branch)."""

    @property
    def connector_params(self) -> int:
        """Connector Linear weight + bias."""
        return self.hidden_size * self.connector_width + self.connector_width

    @property
    def trainable_params(self) -> int:
        return (
            self.layer_params + self.norm_params + self.connector_params + self.t5_embedder_params
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingSetup:
    """The run being planned, per worker (one device each); defaults are the report's reference
    run (8x A100-80GB, global batch 128 = 8 x 8 x 2, bf16, per-block checkpointing)."""

    num_workers: int = 8
    """Data-parallel workers; FSDP shards over all of them."""
    micro_batch: int = 8
    """Samples per worker per forward/backward."""
    grad_accum: int = 2
    """Micro-batches per worker per optimizer step."""
    image_tokens: int = 4096
    """FLUX image tokens per sample: a 1024x1024 bucket -> 128x128 latents -> 64x64 packed 2x2."""
    text_tokens: int = 512
    """FLUX text tokens per sample (the padded conditioning length of a micro-batch)."""
    t5_tokens: int = 0
    """T5 tokens per sample the t5_embedder maps (256 on the T5 branch; counted in text_tokens)."""
    encoder_prompt_tokens: tuple[int, ...] = (538,)
    """Padded length of each prompt the Qwen2-VL layer replays per sample, each a separate call
    (the trainer replays the image prompt and the caption prompt)."""
    compute_bf16: bool = True
    """bf16 compute (autocast / FSDP2 param_dtype); False = fp32 compute."""
    gradient_checkpointing: bool = True
    """Per-FLUX-block activation checkpointing (the Qwen2-VL layer is never checkpointed)."""
    mfu: float = 0.35
    """Model FLOPs utilisation assumed for the run time."""
    peak_tflops: float = 312.0
    """Dense peak per worker in TFLOP/s at the compute precision (A100: 312 bf16)."""
    device_memory_gib: float = 80.0
    """Memory per worker the verdict compares against."""
    overhead_gib: float = 4.0
    """CUDA context, NCCL buffers, allocator fragmentation and transient backward buffers."""

    def __post_init__(self) -> None:
        for name in ("num_workers", "micro_batch", "grad_accum", "image_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.text_tokens < 0 or min(self.encoder_prompt_tokens, default=0) < 0:
            raise ValueError("text_tokens and encoder_prompt_tokens must be >= 0")
        if not 0 < self.mfu <= 1:
            raise ValueError("mfu must be in (0, 1]")
        if self.peak_tflops <= 0 or self.device_memory_gib <= 0 or self.overhead_gib < 0:
            raise ValueError("peak_tflops and device_memory_gib must be > 0, overhead_gib >= 0")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all workers and accumulation steps."""
        return self.num_workers * self.micro_batch * self.grad_accum

    @property
    def flux_tokens(self) -> int:
        """FLUX sequence length L per sample (image + text)."""
        return self.image_tokens + self.text_tokens

    @property
    def encoder_tokens(self) -> int:
        """Tokens the Qwen2-VL layer runs over per sample, all prompts together."""
        return sum(self.encoder_prompt_tokens)

    @property
    def compute_bytes(self) -> int:
        """Bytes of one activation value or one gathered weight at the compute precision."""
        return BF16_BYTES if self.compute_bf16 else FP32_BYTES


def check_block_indices(flux: FluxShape, indices: tuple[int, ...]) -> None:
    """Raise ValueError unless `indices` are distinct FLUX block indices in 0..num_blocks-1."""
    if not indices:
        raise ValueError("a stage needs at least one trainable FLUX block")
    for index in indices:
        if not 0 <= index < flux.num_blocks:
            raise ValueError(f"FLUX block index {index} outside 0..{flux.num_blocks - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate FLUX block index in {indices}")


def trainable_flux_params(
    flux: FluxShape, indices: tuple[int, ...], parts: tuple[str, ...] | None = None
) -> int:
    """Parameters of `parts` (None: all) of FLUX blocks `indices`."""
    check_block_indices(flux, indices)
    return sum(flux.block(index).trained(parts).num_params for index in indices)


def backward_path(flux: FluxShape, indices: tuple[int, ...], *, trains_conditioning: bool) -> range:
    """FLUX blocks whose activation gradients backward computes: from block 0 when the
    conditioning (connector, encoder tail) trains, else from the first trainable block."""
    check_block_indices(flux, indices)
    return range(0 if trains_conditioning else min(indices), flux.num_blocks)
