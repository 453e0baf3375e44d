"""`qwenflux plan`: per-stage parameter counts, per-GPU memory, FLOPs and days at real scale.

Builds FLUX.1-dev's transformer and Qwen2-VL-7B's last decoder layer + final norm from their
public config.json files (shipped in `pipelines/reference_configs/`, or a local checkpoint folder
with the same layout) on the meta device: shapes only, no weights, nothing allocated. The maths
lives in `components/training/capacity.py`; this module measures the shapes and prints the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRMSNorm

from components.training.capacity import (
    GIB,
    BlockShape,
    EncoderTailShape,
    FluxShape,
    MemoryEstimate,
    StagePlan,
    TrainingSetup,
    decoder_layer_saved_values,
    flux_double_saved_values,
    flux_single_saved_values,
    plan_stage,
)
from model.flux_stages import STAGE_BLOCKS, num_blocks, trainable_parameter_names
from model.presets import FLUX_REAL_ID, QWEN2VL_REAL_ID
from pipelines.config_loading import ConfigError, load_toml

REFERENCE_CONFIG_DIR = Path(__file__).parent / "reference_configs"
QWEN2VL_SUBDIR = "qwen2-vl-7b-instruct"
FLUX_SUBDIR = "flux1-dev"
_REFERENCE_SUBDIRS = {QWEN2VL_REAL_ID: QWEN2VL_SUBDIR, FLUX_REAL_ID: FLUX_SUBDIR}

# Parameter-name prefixes inside one FLUX block (diffusers 0.42 names): adaLN modulation runs
# once per sample; in a double block the text stream's weights carry "add_" or "_context".
_PER_SAMPLE_PREFIXES = ("norm1.linear.", "norm1_context.linear.", "norm.linear.")
_TEXT_STREAM_MARKERS = ("add_", "_context")


@dataclass(frozen=True, slots=True)
class PlanReport:
    """The plan of every stage, with the shapes and setup it came from."""

    setup: TrainingSetup
    flux: FluxShape
    tail: EncoderTailShape
    stages: tuple[tuple[int, StagePlan], ...]
    source: str
    """Where the model configs were read from."""

    @property
    def distinct_blocks(self) -> int:
        return len({index for _, stage in self.stages for index in stage.trainable_blocks})

    def format(self) -> str:
        """The plan as printed by `qwenflux plan`."""
        lines = _header_lines(self)
        for number, stage in self.stages:
            lines += _stage_lines(number, stage, self.setup)
        lines.append(f"FLUX blocks trained across the stages: {self.distinct_blocks} distinct")
        return "\n".join(lines)


def plan(
    config_dir: Path | str = REFERENCE_CONFIG_DIR, *, setup: TrainingSetup | None = None
) -> PlanReport:
    """Plan the report's three stages from `config_dir` (holding `qwen2-vl-7b-instruct/` and
    `flux1-dev/transformer/` config.json files) for `setup` (default: 8x A100, batch 128)."""
    config_dir = Path(config_dir)
    return _plan(config_dir / QWEN2VL_SUBDIR, config_dir / FLUX_SUBDIR, setup or TrainingSetup())


def plan_preset(
    preset: str,
    *,
    num_gpus: int | None = None,
    global_batch: int | None = None,
    mfu: float | None = None,
) -> PlanReport:
    """Plan for the checkpoints a preset names (`data.encode.qwen2vl` / `.flux`): the real hub
    ids use the shipped public configs, a local checkpoint folder is read in place. None keeps
    TrainingSetup's default (the report's reference run)."""
    encode = load_toml(_preset_file(preset)).get("data", {}).get("encode", {})
    qwen_dir = _model_dir(encode.get("qwen2vl", QWEN2VL_REAL_ID), "data.encode.qwen2vl")
    flux_dir = _model_dir(encode.get("flux", FLUX_REAL_ID), "data.encode.flux")
    overrides = {"num_gpus": num_gpus, "global_batch": global_batch, "mfu": mfu}
    setup = replace(TrainingSetup(), **{k: v for k, v in overrides.items() if v is not None})
    return _plan(qwen_dir, flux_dir, setup)


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


def flux_shape(transformer: FluxTransformer2DModel) -> FluxShape:
    """Block shapes measured on a (meta) FLUX transformer."""
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return FluxShape(
        hidden_size=width,
        num_double_blocks=len(transformer.transformer_blocks),
        num_single_blocks=len(transformer.single_transformer_blocks),
        double_block=block_shape(
            transformer.transformer_blocks[0], flux_double_saved_values(width), is_double=True
        ),
        single_block=block_shape(
            transformer.single_transformer_blocks[0],
            flux_single_saved_values(width),
            is_double=False,
        ),
        num_params=_count(transformer),
    )


def encoder_tail_shape(
    layer: Qwen2VLDecoderLayer, norm: Qwen2VLRMSNorm, *, joint_attention_dim: int
) -> EncoderTailShape:
    """Trainable encoder side: the layer, the norm and a Linear(hidden -> joint_attention_dim)."""
    config = layer.self_attn.config
    hidden = config.hidden_size
    return EncoderTailShape(
        hidden_size=hidden,
        attention_width=layer.self_attn.q_proj.out_features,
        layer_params=_count(layer),
        norm_params=_count(norm),
        saved_values_per_token=decoder_layer_saved_values(hidden, config.intermediate_size),
        connector_width=joint_attention_dim,
    )


def _plan(qwen_dir: Path, flux_dir: Path, setup: TrainingSetup) -> PlanReport:
    transformer = meta_flux(flux_dir)
    flux = flux_shape(transformer)
    layer, norm = meta_encoder_tail(qwen_dir)
    tail = encoder_tail_shape(
        layer, norm, joint_attention_dim=transformer.config.joint_attention_dim
    )
    sizes = {name: parameter.numel() for name, parameter in transformer.named_parameters()}
    stages = []
    for number, indices in sorted(STAGE_BLOCKS.items()):
        if max(indices) >= num_blocks(transformer):
            raise ConfigError(
                f"{flux_dir}: stage {number} names block {max(indices)}, "
                f"the transformer has {num_blocks(transformer)} blocks"
            )
        stage = plan_stage(flux, tail, setup, indices)
        by_name = sum(sizes[name] for name in trainable_parameter_names(transformer, indices))
        if by_name != stage.trainable_flux_params:
            raise RuntimeError(
                f"stage {number}: {by_name} trainable by name, "
                f"{stage.trainable_flux_params} by block shape"
            )
        stages.append((number, stage))
    return PlanReport(
        setup=setup,
        flux=flux,
        tail=tail,
        stages=tuple(stages),
        source=f"{_shown(qwen_dir)}, {_shown(flux_dir)}",
    )


def _preset_file(name_or_path: str) -> Path:
    # pipelines.config.preset_path's rule, without importing every component config (seconds).
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        return candidate
    return Path(__file__).parent / "configs" / f"{name_or_path}.toml"


def _model_dir(name: str, key: str) -> Path:
    if name in _REFERENCE_SUBDIRS:
        return REFERENCE_CONFIG_DIR / _REFERENCE_SUBDIRS[name]
    if Path(name).is_dir():
        return Path(name)
    raise ConfigError(
        f"{key} = {name!r}: plan knows the shipped configs of {', '.join(_REFERENCE_SUBDIRS)} "
        "or reads a local checkpoint folder, and this is neither"
    )


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _config_folder(folder: Path) -> str:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model config not found: {folder / 'config.json'}")
    return str(folder)


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def block_shape(block: torch.nn.Module, saved: int, *, is_double: bool) -> BlockShape:
    """Parameters of one FLUX block split by the tokens they run on (per-sample adaLN left out)."""
    image, text = 0, 0
    for name, parameter in block.named_parameters():
        if name.startswith(_PER_SAMPLE_PREFIXES):
            continue
        is_text = any(marker in name for marker in _TEXT_STREAM_MARKERS)
        # A single block runs every weight on every token of the joint sequence.
        image += parameter.numel() if not (is_double and is_text) else 0
        text += parameter.numel() if not is_double or is_text else 0
    return BlockShape(
        num_params=_count(block),
        image_token_params=image,
        text_token_params=text,
        saved_values_per_token=saved,
    )


def _header_lines(report: PlanReport) -> list[str]:
    flux, tail, setup = report.flux, report.tail, report.setup
    return [
        f"model configs: {report.source} (meta device, no weights)",
        f"FLUX transformer {_params(flux.num_params)}: {flux.num_double_blocks} double x "
        f"{_params(flux.double_block.num_params)} + {flux.num_single_blocks} single x "
        f"{_params(flux.single_block.num_params)}, width {flux.hidden_size}",
        f"trains in every stage: connector {tail.hidden_size}->"
        f"{tail.connector_width} {_params(tail.connector_params)}"
        f", Qwen2-VL last layer {_params(tail.layer_params)} + norm {tail.norm_params:,}",
        f"setup: {setup.num_gpus} GPUs x {setup.gpu_memory_gib:g} GiB, global batch "
        f"{setup.global_batch} = {setup.num_gpus} GPUs x {setup.micro_batch} x "
        f"{setup.grad_accum} accum; tokens/sample: FLUX {setup.image_tokens} image + "
        f"{setup.text_tokens} text, Qwen2-VL layer {setup.encoder_tokens}",
        "precision: frozen bf16; trainable fp32 master + fp32 grad + fp32 AdamW (16 B/param);"
        " bf16 compute; gradient checkpointing per block",
        f"time: model FLOPs / ({setup.num_gpus} x {setup.peak_tflops:g} TFLOP/s bf16 peak x MFU "
        f"{setup.mfu:g}), {setup.num_steps:,} steps",
    ]


def _stage_lines(number: int, stage: StagePlan, setup: TrainingSetup) -> list[str]:
    flops, capacity = stage.flops, setup.gpu_memory_gib * GIB
    first, last = stage.backward_blocks
    return [
        "",
        f"stage {number}: FLUX blocks {list(stage.trainable_blocks)}",
        f"  trainable  {_params(stage.trainable_params)} = FLUX "
        f"{_params(stage.trainable_flux_params)} + connector {_params(stage.connector_params)}"
        f" + Qwen2-VL tail {_params(stage.tail_params)}",
        "  memory/GPU GiB  weights  grads  optim  activ  working  other   total",
        _memory_line(stage.ddp, capacity),
        _memory_line(stage.fsdp, capacity),
        f"  per step   {stage.flux_tokens_per_step:,} FLUX tokens + "
        f"{stage.encoder_tokens_per_step:,} Qwen2-VL tokens; backward path blocks {first}..{last}",
        f"  FLOPs/step {flops.model / 1e15:.1f} PFLOP model (fwd {flops.forward / 1e15:.1f}, "
        f"bwd-input {flops.backward_input / 1e15:.1f}, bwd-weight "
        f"{flops.backward_weight / 1e15:.1f}) + {flops.recompute / 1e15:.1f} recompute",
        f"  run time   {stage.step_seconds:.1f} s/step -> {stage.days:.1f} days for "
        f"{setup.num_steps:,} steps",
    ]


def _memory_line(memory: MemoryEstimate, capacity: float) -> str:
    parts = (
        memory.weights,
        memory.grads,
        memory.optimizer,
        memory.activations,
        memory.working,
        memory.overhead,
        memory.total,
    )
    cells = "".join(f"{part / GIB:7.1f}" for part in parts)
    headroom = (capacity - memory.total) / GIB
    verdict = (
        f"fits ({headroom:.1f} free)"
        if memory.fits(capacity)
        else (f"DOES NOT FIT (over by {-headroom:.1f})")
    )
    return f"  {memory.strategy:<4}          {cells}  {verdict}"


def _params(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.3f}B"
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"
