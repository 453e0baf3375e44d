"""`qwenflux plan --config PRESET [--set k=v]`: memory, FLOPs and days per stage of that preset.

The preset goes through `pipelines.config.load_config` like every other command (unknown keys
rejected by name, `--set section.key=value` overrides) and the plan is of what it would train:
`train.stages` (FLUX blocks, steps), `train.resources` (workers, GPUs per worker, ddp/fsdp, mixed
precision, gradient checkpointing), global batch = workers x `train.micro_batch_size` x
`train.accumulation_steps`, the checkpoints of `data.encode`, token counts from `data.buckets`,
`data.encode.image_tokens` and `train.objective`. What training does not say (MFU, a device's
peak and memory, overhead, prompt lengths) is `[plan]` (PlanConfig). The maths lives in
`components/training/capacity.py`, the shapes are measured by
`components/training/capacity_measure.py`; this module builds the models and prints the plan.

Shapes come from config.json files only, built on the meta device (no weights): the real hub
ids (Qwen/Qwen2-VL-7B-Instruct, black-forest-labs/FLUX.1-dev) read the public configs shipped in
`pipelines/reference_configs/`; a local checkpoint folder (the tiny preset's `runs/tiny-models/`)
is read in place; another hub id is read from the local HF cache. Anything else is a ConfigError
naming the key. So the tiny preset needs its tiny checkpoints on disk (`qwenflux tiny-models
--out runs/tiny-models`): the plan does not fall back to `model/presets.py`'s builders, because
a folder the preset names may hold any model, and a plan of a guessed model could differ from
what the run trains.

Token counts per sample are upper bounds: every step at the largest bucket (by area), FLUX's text
stream padded to the longest conditioning the objective draws, the Qwen2-VL layer replaying both
the image and the caption prompt (as the trainer does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRMSNorm

from components.checkpoints import CheckpointNotFoundError, resolve_checkpoint
from components.data.buckets import Bucket, BucketConfig, build_buckets
from components.training.capacity import (
    GIB,
    SECONDS_PER_DAY,
    EncoderTailShape,
    FluxShape,
    MemoryEstimate,
    StagePlan,
    TrainingSetup,
    plan_stage,
)
from components.training.capacity_measure import encoder_tail_shape, flux_shape
from components.training.objective import ObjectiveConfig
from model.flux_stages import num_blocks, trainable_parameter_names
from model.presets import FLUX_REAL_ID, QWEN2VL_REAL_ID, T5_MAX_TOKENS, VAE_SCALE_FACTOR
from pipelines.config import PipelineConfig, load_config, preset_path
from pipelines.config_loading import ConfigError

REFERENCE_CONFIG_DIR = Path(__file__).parent / "reference_configs"
QWEN2VL_SUBDIR = "qwen2-vl-7b-instruct"
FLUX_SUBDIR = "flux1-dev"
_REFERENCE_SUBDIRS = {QWEN2VL_REAL_ID: QWEN2VL_SUBDIR, FLUX_REAL_ID: FLUX_SUBDIR}
FLUX_PIXELS_PER_TOKEN_SIDE = VAE_SCALE_FACTOR * 2
"""A FLUX image token is 2x2 packed latents of the /8 VAE: 16x16 pixels."""


@dataclass(frozen=True, slots=True)
class StageReport:
    """One configured stage and its plan."""

    number: int
    """1-based position in train.stages."""
    name: str
    plan: StagePlan


@dataclass(frozen=True, slots=True)
class PlanReport:
    """The plan of every configured stage, with the config, shapes and setup it came from."""

    preset: str
    """The preset file planned."""
    config: PipelineConfig
    setup: TrainingSetup
    flux: FluxShape
    tail: EncoderTailShape
    stages: tuple[StageReport, ...]
    source: str
    """Where the model configs were read from."""
    largest_bucket: Bucket
    """The bucket the token counts are taken at."""
    text_tokens_note: str
    """What FLUX's text length is made of."""

    @property
    def distinct_blocks(self) -> int:
        return len({index for stage in self.stages for index in stage.plan.trainable_blocks})

    @property
    def strategy(self) -> str:
        return self.config.train.resources.strategy

    def format(self) -> str:
        """The plan as printed by `qwenflux plan`."""
        lines = _header_lines(self)
        for stage in self.stages:
            lines += _stage_lines(self, stage)
        lines.append(f"FLUX blocks trained across the stages: {self.distinct_blocks} distinct")
        lines.append(_summary_line(self))
        return "\n".join(lines)


def plan_preset(name_or_path: str, overrides: tuple[str, ...] | list[str] = ()) -> PlanReport:
    """Load a preset strictly (with `section.key=value` overrides) and plan it."""
    config = load_config(name_or_path, overrides)
    return plan_config(config, preset=_shown(preset_path(name_or_path)))


def plan_config(config: PipelineConfig, *, preset: str) -> PlanReport:
    """Plan every stage of `config.train.stages` for the checkpoints and resources it names."""
    encode = config.data.encode
    qwen_dir = model_dir(encode.qwen2vl, encode.qwen2vl_revision, key="data.encode.qwen2vl")
    flux_dir = model_dir(encode.flux, encode.flux_revision, key="data.encode.flux")
    transformer = meta_flux(flux_dir)
    flux = flux_shape(transformer)
    layer, norm = meta_encoder_tail(qwen_dir)
    tail = encoder_tail_shape(
        layer,
        norm,
        joint_attention_dim=transformer.config.joint_attention_dim,
        t5_embedder_params=_t5_embedder_params(config, flux_dir, transformer),
    )
    setup, bucket, note = training_setup(config)
    sizes = {name: parameter.numel() for name, parameter in transformer.named_parameters()}
    stages = []
    for number, stage in enumerate(config.train.stages, start=1):
        blocks = stage.flux_blocks
        if min(blocks) < 0 or max(blocks) >= num_blocks(transformer):
            raise ConfigError(
                f"train.stages.{number}.flux_blocks: {list(blocks)} outside 0.."
                f"{num_blocks(transformer) - 1}, the blocks of {_shown(flux_dir)}"
            )
        parts = None if stage.flux_parts == ("all",) else stage.flux_parts
        planned = plan_stage(flux, tail, setup, blocks, num_steps=stage.num_steps, parts=parts)
        names = trainable_parameter_names(transformer, blocks, stage.flux_parts)
        by_name = sum(sizes[name] for name in names)
        if by_name != planned.trainable_flux_params:
            raise RuntimeError(
                f"stage {number}: {by_name} trainable by name, "
                f"{planned.trainable_flux_params} by block shape"
            )
        stages.append(StageReport(number=number, name=stage.name, plan=planned))
    return PlanReport(
        preset=preset,
        config=config,
        setup=setup,
        flux=flux,
        tail=tail,
        stages=tuple(stages),
        source=f"{_shown(qwen_dir)}, {_shown(flux_dir)}",
        largest_bucket=bucket,
        text_tokens_note=note,
    )


def training_setup(config: PipelineConfig) -> tuple[TrainingSetup, Bucket, str]:
    """The TrainingSetup `config` trains with, the bucket its tokens are counted at, and what
    FLUX's text length is made of. A worker with a fraction f of a GPU gets f of its memory
    and peak; a worker trains on one device however many it reserves."""
    train, resources, plan = config.train, config.train.resources, config.plan
    share = resources.gpus_per_worker if 0 < resources.gpus_per_worker < 1 else 1.0
    image_tokens, bucket = flux_image_tokens(config.data.buckets)
    conditioning = config.data.encode.image_tokens
    caption = plan.caption_prompt_tokens
    text_tokens, note = flux_text_tokens(train.objective, image=conditioning, caption=caption)
    prompts, t5_tokens = (conditioning + plan.image_prompt_extra_tokens, caption), 0
    if train.text_branch == "t5":
        # The caption comes as T5 tokens appended to every sample (masked where unused); the
        # Qwen2-VL layer replays the image prompt alone.
        t5_tokens = T5_MAX_TOKENS
        image_part = conditioning if train.objective.drop_rate < 1 else 1
        text_tokens = image_part + t5_tokens
        note = f"{image_part} image + {t5_tokens} T5 caption tokens"
        prompts = prompts[:1]
    setup = TrainingSetup(
        num_workers=resources.num_workers,
        micro_batch=train.micro_batch_size,
        grad_accum=train.accumulation_steps,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        t5_tokens=t5_tokens,
        encoder_prompt_tokens=prompts,
        compute_bf16=resources.computes_in_bf16(on_gpu=resources.gpus_per_worker > 0),
        gradient_checkpointing=resources.gradient_checkpointing,
        mfu=plan.mfu,
        peak_tflops=plan.device_peak_tflops * share,
        device_memory_gib=plan.device_memory_gib * share,
        overhead_gib=plan.overhead_gib,
    )
    return setup, bucket, note


def flux_image_tokens(buckets: BucketConfig) -> tuple[int, Bucket]:
    """FLUX image tokens of the largest bucket (by area), and that bucket."""
    largest = max(build_buckets(buckets), key=lambda bucket: bucket.width_px * bucket.height_px)
    side = FLUX_PIXELS_PER_TOKEN_SIDE
    return (largest.width_px // side) * (largest.height_px // side), largest


def flux_text_tokens(objective: ObjectiveConfig, *, image: int, caption: int) -> tuple[int, str]:
    """FLUX text length of a micro-batch padded to the longest conditioning `objective` can
    draw (image tokens, caption prompt, or both), and what it is made of."""
    if objective.drop_rate >= 1:
        return 1, "every sample unconditional: one masked slot"
    choices = (
        (image, f"{image} image"),
        (caption, f"{caption} caption prompt"),
        (image + caption, f"{image} image + {caption} caption prompt"),
    )
    probabilities = zip(choices, objective.probabilities, strict=True)
    return max(choice for choice, probability in probabilities if probability > 0)


def model_dir(name: str, revision: str | None, *, key: str) -> Path:
    """Folder holding the model's config.json (Qwen2-VL) or transformer/config.json (FLUX)."""
    if name in _REFERENCE_SUBDIRS:
        return REFERENCE_CONFIG_DIR / _REFERENCE_SUBDIRS[name]
    root_file = "model_index.json" if key.endswith("flux") else "config.json"
    try:
        return resolve_checkpoint(name, revision=revision, root_file=root_file, required=()).path
    except CheckpointNotFoundError as error:
        raise ConfigError(
            f"{key} = {name!r}: {error}. The plan reads the config of the checkpoint the preset "
            f"names: shipped public configs for {', '.join(_REFERENCE_SUBDIRS)}, else a local "
            "folder or the local HF cache (tiny checkpoints: `qwenflux tiny-models --out DIR`)"
        ) from None


def meta_flux(flux_dir: Path) -> FluxTransformer2DModel:
    """FLUX transformer from `<flux_dir>/transformer/config.json` on the meta device."""
    config = FluxTransformer2DModel.load_config(_config_folder(flux_dir / "transformer"))
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def meta_encoder_tail(qwen_dir: Path) -> tuple[Qwen2VLDecoderLayer, Qwen2VLRMSNorm]:
    """Qwen2-VL's last decoder layer and final norm from `<qwen_dir>/config.json`, on meta."""
    text_config = Qwen2VLConfig.from_pretrained(_config_folder(qwen_dir)).text_config
    with torch.device("meta"):
        layer = Qwen2VLDecoderLayer(text_config, layer_idx=text_config.num_hidden_layers - 1)
        norm = Qwen2VLRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
    return layer, norm


def _t5_embedder_params(config: PipelineConfig, flux_dir: Path, transformer) -> int:
    """Linear(T5 width -> FLUX inner width) on the T5 branch (its width from
    `<flux>/text_encoder_2/config.json`), else 0."""
    if config.train.text_branch != "t5":
        return 0
    path = flux_dir / "text_encoder_2" / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"train.text_branch: {_shown(flux_dir)} has no text_encoder_2/config.json, the T5 "
            "encoder the T5 branch reads"
        )
    width = int(json.loads(path.read_text())["d_model"])
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return width * inner + inner


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _config_folder(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model config not found: {folder / 'config.json'}")
    return str(folder)


def _device(report: PlanReport) -> str:
    gpus = report.config.train.resources.gpus_per_worker
    return "CPU worker" if gpus == 0 else "GPU" if gpus == 1 else "worker"


def _header_lines(report: PlanReport) -> list[str]:
    flux, tail, setup, bucket = report.flux, report.tail, report.setup, report.largest_bucket
    device, run = _device(report), report.config.run.name
    gpus = report.config.train.resources.gpus_per_worker
    share = f" ({gpus:g} GPU each)" if device == "worker" else ""
    replayed = " + ".join(
        f"{tokens} {name} prompt"
        for tokens, name in zip(setup.encoder_prompt_tokens, ("image", "caption"), strict=False)
    )
    t5 = f", T5 embedder {_params(tail.t5_embedder_params)}" if tail.t5_embedder_params else ""
    compute = "bf16 compute" if setup.compute_bf16 else "fp32 compute (activations upper bound)"
    checkpointing = (
        "gradient checkpointing per FLUX block"
        if setup.gradient_checkpointing
        else "no gradient checkpointing"
    )
    return [
        f"preset: {report.preset} (run {run}); assumptions beyond training from [plan]",
        f"model configs: {report.source} (meta device, no weights)",
        f"FLUX transformer {_params(flux.num_params)}: {flux.num_double_blocks} double x "
        f"{_params(flux.double_block.num_params)} + {flux.num_single_blocks} single x "
        f"{_params(flux.single_block.num_params)}, width {flux.hidden_size}",
        f"trains in every stage: connector {tail.hidden_size}->"
        f"{tail.connector_width} {_params(tail.connector_params)}"
        f", Qwen2-VL last layer {_params(tail.layer_params)} + norm {tail.norm_params:,}{t5}",
        f"setup: {setup.num_workers} {device}s{share} x {setup.device_memory_gib:g} GiB, "
        f"global batch {setup.global_batch} = {setup.num_workers} {device}s x "
        f"{setup.micro_batch} x {setup.grad_accum} accum; strategy {report.strategy}",
        f"tokens/sample: FLUX {setup.image_tokens} image (bucket {bucket.bucket_id}) + "
        f"{setup.text_tokens} text ({report.text_tokens_note}), Qwen2-VL layer {replayed}",
        f"precision: {compute}; frozen fp32; trainable fp32 master + fp32 grad + fp32 AdamW "
        f"(16 B/param); {checkpointing}; the Qwen2-VL layer keeps its activations",
        f"time: model FLOPs / ({setup.num_workers} x {setup.peak_tflops:g} TFLOP/s peak x MFU "
        f"{setup.mfu:g})",
    ]


def _stage_lines(report: PlanReport, stage: StageReport) -> list[str]:
    planned, capacity = stage.plan, report.setup.device_memory_gib * GIB
    flops, (first, last) = planned.flops, planned.backward_blocks
    scale, unit = _flops_unit(flops.model)
    memory_unit = _memory_unit(report)
    memory = [
        _memory_line(
            estimate, capacity, memory_unit, is_configured=estimate.strategy == report.strategy
        )
        for estimate in (planned.ddp, planned.fsdp)
    ]
    return [
        "",
        f"stage {stage.number} ({stage.name}, {planned.num_steps:,} steps): FLUX blocks "
        f"{list(planned.trainable_blocks)}{_parts_shown(planned.trainable_parts)}",
        f"  trainable  {_params(planned.trainable_params)} = FLUX "
        f"{_params(planned.trainable_flux_params)} + connector "
        f"{_params(planned.connector_params)} + Qwen2-VL tail {_params(planned.tail_params)}"
        + (
            f" + T5 embedder {_params(planned.t5_embedder_params)}"
            if planned.t5_embedder_params
            else ""
        ),
        f"  memory/{_device(report)} {memory_unit[1]}  weights  grads  optim  activ  working"
        "  other   total",
        *memory,
        f"  per step   {planned.flux_tokens_per_step:,} FLUX tokens + "
        f"{planned.encoder_tokens_per_step:,} Qwen2-VL tokens; backward path blocks "
        f"{first}..{last}",
        f"  FLOPs/step {flops.model / scale:.1f} {unit} model (fwd {flops.forward / scale:.1f}, "
        f"bwd-input {flops.backward_input / scale:.1f}, bwd-weight "
        f"{flops.backward_weight / scale:.1f}) + {flops.recompute / scale:.1f} recompute",
        f"  run time   {planned.step_seconds:.1f} s/step -> "
        f"{_duration(planned.step_seconds * planned.num_steps)} for {planned.num_steps:,} steps",
    ]


def _memory_line(
    memory: MemoryEstimate, capacity: float, unit: tuple[float, str], *, is_configured: bool
) -> str:
    parts = (
        memory.weights,
        memory.grads,
        memory.optimizer,
        memory.activations,
        memory.working,
        memory.overhead,
        memory.total,
    )
    cells = "".join(f"{part / unit[0]:7.1f}" for part in parts)
    headroom = (capacity - memory.total) / unit[0]
    verdict = (
        f"fits ({headroom:.1f} free)"
        if memory.fits(capacity)
        else f"DOES NOT FIT (over by {-headroom:.1f})"
    )
    marker = "  <- train.resources.strategy" if is_configured else ""
    return f"  {memory.strategy:<4}          {cells}  {verdict}{marker}"


def _summary_line(report: PlanReport) -> str:
    steps = sum(stage.plan.num_steps for stage in report.stages)
    seconds = sum(stage.plan.step_seconds * stage.plan.num_steps for stage in report.stages)
    capacity = report.setup.device_memory_gib * GIB
    over = [
        str(stage.number)
        for stage in report.stages
        if not stage.plan.memory(report.strategy).fits(capacity)
    ]
    verdict = f"DOES NOT FIT in stage {', '.join(over)}" if over else "fits in every stage"
    return (
        f"whole run: {steps:,} steps, {_duration(seconds)} at MFU {report.setup.mfu:g}; "
        f"{report.strategy} {verdict} ({report.setup.device_memory_gib:g} GiB)"
    )


def _parts_shown(parts: tuple[str, ...] | None) -> str:
    return "" if parts is None else f", parts {' + '.join(parts)} only"


def _flops_unit(flops: float) -> tuple[float, str]:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return scale, unit
    return 1e6, "MFLOP"


def _memory_unit(report: PlanReport) -> tuple[float, str]:
    # MiB when every estimate is under 1 GiB (tiny models), so the table does not read 0.0.
    largest = max(max(stage.plan.ddp.total, stage.plan.fsdp.total) for stage in report.stages)
    return (GIB, "GiB") if largest >= GIB else (1024**2, "MiB")


def _duration(seconds: float) -> str:
    if seconds >= SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_DAY:.1f} days"
    return f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds / 60:.1f} minutes"


def _params(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.3f}B"
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"
