"""One prepared GPU check: Qwen2VL-Flux's training and encoding costs on one card, at real size.

    python tests/benchmarks/bench_gpu.py [--smoke] [--only NAME] [--steps N] [--peak-tflops T]

One markdown table, a row per measurement (ratio = measured / reference), all in bf16 autocast:
- double_block, single_block: a FLUX.1-dev-width block trained over fp32 masters with AdamW on
  8 x (4096 + 512) tokens; MFU of the dense bf16 peak, model FLOPs by the planner's step_flops.
- stage1_memory, stage1_step: the full FLUX.1-dev transformer (random weights built on the meta
  device) at 1024x1024, stage 1's blocks trainable (fp32 masters + AdamW), the rest frozen in
  bf16, per-block checkpointing: peak max_memory_allocated and s/step at the largest micro-batch
  (1, 2, 4, ... 16) that fits, beside plan_stage's DDP estimate (1 worker, no connector or tail,
  so backward starts at the first trainable block) with frozen weights at 2 B (it assumes fp32:
  its own figure is in the notes) and no overhead (not in max_memory_allocated), and its step
  time at its MFU (0.35).
- qwen_encode: Qwen2-VL-7B's prefix (vision + decoder layers 0..26), a 896x448 px image (512
  tokens) in a 538-token prompt: images/s beside the FLOP bound 2 x params x tokens + 4 N^2 width
  per attention layer (causal counted in full).
- vae_encode: the FLUX VAE encoder at 1024x1024: images/s beside the FLOP bound counted by
  FlopCounterMode (which misses SDPA's CPU kernel: smoke runs only).
- tail_replay: qwen2vl_tail.replay_last_layer on random bf16-valued penultimate states, bf16
  against fp32: ||bf16 - fp32|| / ||fp32|| within 2e-2.
A measurement that raises prints its error as its rows' result; exit code 1 if one did or the
replay check failed (an OOM is a result). --smoke: the same code at toy size on CPU. Needs only
torch, diffusers, transformers. Wheels for this project's device machine (constraints.txt's
pins), in the repo root: `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0 httpx2==2.16.2
httpcore2==2.16.2 truststore==0.10.5 importlib_metadata==9.1.0`; run with carry [".whl"]:
`python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target
/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 tests/benchmarks/bench_gpu.py`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.models.transformers import transformer_flux
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from components.training import capacity, capacity_measure, capacity_shapes  # noqa: E402
from model import flux_forward, flux_stages, qwen2vl_tail  # noqa: E402
from model.latent_codec import latent_image_ids  # noqa: E402

CONFIGS = REPO_ROOT / "pipelines" / "reference_configs"
FLUX_VAE_CONFIG = json.loads("""{
  "in_channels": 3, "out_channels": 3, "latent_channels": 16, "norm_num_groups": 32,
  "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 1024,
  "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": false,
  "use_post_quant_conv": false, "mid_block_add_attention": true, "force_upcast": true}""")
FLUX_VAE_CONFIG |= {"down_block_types": ["DownEncoderBlock2D"] * 4}
FLUX_VAE_CONFIG |= {"up_block_types": ["UpDecoderBlock2D"] * 4}
"""The public black-forest-labs/FLUX.1-dev vae/config.json (not in reference_configs/)."""
PEAK_BF16_TFLOPS = {"NVL": None, "H100 PCIE": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
PEAK_BF16_TFLOPS["L40S"] = 362.0
"""Dense bf16 TFLOP/s (data sheets; H100 = SXM) of the first key whose words the card name has."""
REPLAY_RELATIVE_TOLERANCE = 2e-2
_TAIL_FIELDS = dataclasses.fields(capacity_shapes.EncoderTailShape)
NO_TAIL = capacity_shapes.EncoderTailShape(**{field.name: 0 for field in _TAIL_FIELDS})
"""Nothing trains on the encoder side here (no connector, no Qwen2-VL layer)."""
NO_PEAK = "n/a (no peak for this device)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale:
    """What one run measures at: the public models (these defaults) on a GPU, or toy ones."""

    device: torch.device
    flux: dict
    qwen: dict
    vae: dict = dataclasses.field(default_factory=lambda: dict(FLUX_VAE_CONFIG))
    steps: int
    peak_tflops: float | None
    image_tokens: int = 4096  # packed 2x2 latent tokens of a square image: 1024 px / 16, squared
    text_tokens: int = 512
    block_batch: int = 8
    stage_blocks: tuple[int, ...] = flux_stages.STAGE_BLOCKS[1]
    max_micro_batch: int = 16
    qwen_grid_thw: tuple[int, int, int] = (1, 32, 64)  # vision patches of the one image
    vae_pixels: int = 1024
    vae_batch: int = 4


Row = collections.namedtuple("Row", "name measured reference ratio notes failed")
Row.__new__.__defaults__ = ("", "", "", False)


def build_scale(device: torch.device, *, smoke: bool, steps: int, peak: float | None) -> Scale:
    """The public configs, or (smoke) them at toy widths and depths with stage blocks 1 and 3."""
    read = lambda folder: json.loads((CONFIGS / folder / "config.json").read_text())  # noqa: E731
    flux, t5 = read("flux1-dev/transformer"), read("flux1-dev/text_encoder_2")
    if t5["d_model"] != flux["joint_attention_dim"]:  # FLUX's text tokens are T5-XXL wide
        raise ValueError("T5's d_model and FLUX's joint_attention_dim differ")
    qwen = read("qwen2-vl-7b-instruct")
    public = Scale(device=device, flux=flux, qwen=qwen, steps=steps, peak_tflops=peak)
    if not smoke:
        return public
    flux = {**public.flux, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2}
    flux |= {"num_single_layers": 3, "joint_attention_dim": 32, "pooled_projection_dim": 16}
    flux["axes_dims_rope"] = [4, 6, 6]
    qwen = {**public.qwen, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
    qwen |= {"num_attention_heads": 4, "num_key_value_heads": 2}
    qwen["rope_scaling"] = {**qwen["rope_scaling"], "mrope_section": [2, 3, 3]}
    vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 2}
    qwen["vision_config"] = {**qwen["vision_config"], **vision}
    vae = {**FLUX_VAE_CONFIG, "block_out_channels": [8, 16], "norm_num_groups": 4}
    vae |= {"down_block_types": ["DownEncoderBlock2D"] * 2, "layers_per_block": 1}
    vae |= {"up_block_types": ["UpDecoderBlock2D"] * 2, "sample_size": 64}
    models = {"flux": flux, "qwen": qwen, "vae": vae, "image_tokens": 64, "text_tokens": 16}
    sizes = {"block_batch": 1, "stage_blocks": (1, 3), "max_micro_batch": 2}
    inputs = {"qwen_grid_thw": (1, 4, 8), "vae_pixels": 64, "vae_batch": 1}
    return dataclasses.replace(public, **models, **sizes, **inputs)


def materialise(module: nn.Module, device: torch.device, dtype_of: Callable) -> nn.Module:
    """Random storage on `device` for a meta module, in dtype_of(each parameter): normal(0,
    fan_in^-1/2) matrices and kernels, ones for 1-D weights (norm scales), zeros for biases;
    modules with meta buffers (rope frequencies __init__ computes) are rebuilt from config."""
    generator = torch.Generator(device=device).manual_seed(0)
    for owner in module.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            value = torch.empty(parameter.shape, dtype=dtype_of(parameter), device=device)
            if value.ndim >= 2:
                value.normal_(0.0, value[0].numel() ** -0.5, generator=generator)
            else:
                value.fill_(1.0 if name == "weight" else 0.0)
            setattr(owner, name, nn.Parameter(value, requires_grad=parameter.requires_grad))
        if any(buffer.is_meta for buffer in owner.buffers(recurse=False)):
            with torch.device(device):
                rebuilt = type(owner)(owner.config)
            for name, buffer in rebuilt.named_buffers(recurse=False):
                setattr(owner, name, buffer)
    return module.to(device)


def seconds_per_call(step: Callable, scale: Scale, *, warmup: int = 2) -> float:
    """Mean seconds of `scale.steps` calls after `warmup` untimed ones."""
    synchronize = torch.cuda.synchronize if scale.device.type == "cuda" else lambda: None
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(scale.steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / scale.steps


def ratio(measured: float | None, reference: float | None) -> str:
    return f"{measured / reference:.3f}" if measured and reference else "n/a"


def training_step(module: nn.Module, forward: Callable, device: torch.device) -> Callable:
    """bf16 autocast forward, fp32 loss (mean squares of forward()'s tensors), backward, AdamW."""
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = forward()
        sum(output.float().square().mean() for output in outputs).backward()
        optimizer.step()

    return step


def measure_block(scale: Scale, *, double: bool) -> list[Row]:
    """Train one FLUX block at the config's width (inputs that require grad, as on the path)."""
    device, batch, heads = scale.device, scale.block_batch, scale.flux["num_attention_heads"]
    head_dim = scale.flux["attention_head_dim"]
    width, length = heads * head_dim, scale.image_tokens + scale.text_tokens
    kind = "FluxTransformerBlock" if double else "FluxSingleTransformerBlock"
    with torch.device("meta"):
        block = getattr(transformer_flux, kind)(width, heads, head_dim)
    # Model FLOPs: the planner's step_flops on a one-block FluxShape, no checkpointing.
    shape = capacity_measure.block_shape(block, 0, is_double=double)
    fields = {"hidden_size": width, "double_block": shape, "single_block": shape}
    fields |= {"num_double_blocks": int(double), "num_single_blocks": int(not double)}
    one_block = capacity_shapes.FluxShape(**fields, num_params=shape.num_params)
    setup = stage_setup(scale, micro_batch=batch, checkpointing=False)
    flops = capacity.step_flops(one_block, NO_TAIL, setup, indices=(0,), path=range(1)).model
    block = materialise(block, device, lambda parameter: torch.float32)
    torch.manual_seed(0)
    image = torch.randn(batch, scale.image_tokens, width, device=device, requires_grad=True)
    text = torch.randn(batch, scale.text_tokens, width, device=device, requires_grad=True)
    temb = torch.randn(batch, width, device=device)
    # Identity rotation (cos 1, sin 0): FLUX's rope costs the same whatever the angles.
    rotary = tuple(torch.full((length, head_dim), value, device=device) for value in (1.0, 0.0))
    forward = lambda: block(image, text, temb, image_rotary_emb=rotary)  # noqa: E731
    seconds = seconds_per_call(training_step(block, forward, device), scale)
    achieved, peak = flops / seconds / 1e12, scale.peak_tflops
    measured = f"{achieved:.4g} TFLOP/s ({seconds * 1e3:.4g} ms/step)"
    reference = f"{peak:g} TFLOP/s peak" if peak else NO_PEAK
    notes = f"width {width}, batch {batch} x ({scale.image_tokens} image + {scale.text_tokens}"
    notes += f" text) tokens; {flops / 1e12:.4g} TFLOP/step (planner's formulas)"
    name = "double_block" if double else "single_block"
    return [Row(name, measured, reference, f"MFU {ratio(achieved, peak)}", notes)]


def stage_setup(scale: Scale, *, micro_batch: int, checkpointing: bool = True):
    """The planner's TrainingSetup: one worker, one micro-batch per step, no encoder replay."""
    fields = {"image_tokens": scale.image_tokens, "text_tokens": scale.text_tokens}
    fields |= {"num_workers": 1, "grad_accum": 1, "encoder_prompt_tokens": ()}
    fields |= {"gradient_checkpointing": checkpointing, "peak_tflops": scale.peak_tflops or 1.0}
    return capacity_shapes.TrainingSetup(micro_batch=micro_batch, **fields)


def try_micro_batch(transformer, scale: Scale, batch: int) -> tuple[float, float] | None:
    """(s/step, peak bytes: nan on CPU) over 1 warm-up + steps // 2 timed steps; None on OOM."""
    device, config, text = scale.device, scale.flux, scale.text_tokens
    latents = torch.randn(batch, scale.image_tokens, config["in_channels"], device=device)
    conditioning = flux_forward.FluxConditioning(
        hidden_BTD=torch.randn(batch, text, config["joint_attention_dim"], device=device),
        mask_BT=torch.ones(batch, text, dtype=torch.bool, device=device),
        pooled_BP=torch.randn(batch, config["pooled_projection_dim"], device=device),
        guidance_B=torch.full((batch,), 3.5, device=device),
    )
    side = 2 * math.isqrt(scale.image_tokens)  # latent height = width
    ids = latent_image_ids(side, width_latent=side).to(device)
    inputs = {"image_ids_L3": ids, "sigmas_B": torch.rand(batch, device=device)}
    inputs["conditioning"], target = conditioning, torch.randn_like(latents)
    forward = lambda: [flux_forward.predict_velocity(transformer, latents, **inputs) - target]  # noqa: E731
    free_memory(device)
    timed = dataclasses.replace(scale, steps=max(1, scale.steps // 2))  # a step takes seconds
    try:
        seconds = seconds_per_call(training_step(transformer, forward, device), timed, warmup=1)
    except torch.cuda.OutOfMemoryError:
        seconds = None
    transformer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return None if seconds is None else (seconds, peak)


def measure_stage(scale: Scale) -> list[Row]:
    """Stage 1 of the full transformer at the largest micro-batch that fits (module doc)."""
    with torch.device("meta"):
        transformer = diffusers.FluxTransformer2DModel.from_config(scale.flux)
    trainable = flux_stages.select_trainable_blocks(transformer, scale.stage_blocks)
    shape = capacity_measure.flux_shape(transformer)
    dtype_of = lambda parameter: torch.float32 if parameter.requires_grad else torch.bfloat16  # noqa: E731
    transformer = materialise(transformer, scale.device, dtype_of).train()
    flux_forward.set_gradient_checkpointing(transformer, enabled=True)
    fits, tried, batch = {}, [], 1
    while batch <= scale.max_micro_batch:
        outcome = try_micro_batch(transformer, scale, batch)
        tried.append(f"{batch} {'OOM' if outcome is None else 'fits'}")
        if outcome is None:
            break
        fits[batch], batch = outcome, batch * 2
    best = max(fits, default=1)
    setup = stage_setup(scale, micro_batch=best)
    gib, once = capacity_shapes.GIB, {"num_steps": 1, "trains_conditioning": False}
    plan = capacity.plan_stage(shape, NO_TAIL, setup, scale.stage_blocks, **once)
    weights = (shape.num_params - trainable) * capacity_shapes.BF16_BYTES
    weights += trainable * capacity_shapes.FP32_BYTES
    planned = dataclasses.replace(plan.ddp, weights=weights, overhead=0.0).total
    seconds, peak = fits.get(best, (None, None))
    peak = peak if scale.device.type == "cuda" else None
    memory = f"{peak / gib:.4g} GiB" if peak else "n/a on cpu" if fits else "OOM"
    memory += f" at micro-batch {best}"
    planned_memory = f"{planned / gib:.4g} GiB planner (frozen bf16, no overhead)"
    as_is = f"frozen fp32, +{plan.ddp.overhead / gib:g} GiB overhead: {plan.ddp.total / gib:.4g}"
    memory_notes = f"{trainable / 1e6:,.1f}M params trainable; micro-batch {', '.join(tried)}"
    memory_notes += f"; the planner as is ({as_is} GiB)"
    step = f"{seconds:.4g} s/step at micro-batch {best}" if seconds else "n/a (no fit)"
    planned_s = plan.step_seconds if scale.peak_tflops else None
    planned_step = f"{planned_s:.4g} s/step planner at MFU {setup.mfu:g}" if planned_s else NO_PEAK
    achieved = plan.flops.model / seconds / 1e12 if seconds else None
    step_notes = f"{plan.flops.model / 1e12:.4g} TFLOP/step (planner's model FLOPs); achieved"
    step_notes += f" {achieved or 0:.4g} TFLOP/s, MFU {ratio(achieved, scale.peak_tflops)}"
    return [
        Row("stage1_memory", memory, planned_memory, ratio(peak, planned), memory_notes),
        Row("stage1_step", step, planned_step, ratio(seconds, planned_s), step_notes),
    ]


def qwen_on_meta(scale: Scale) -> tuple:
    """Qwen2-VL's config (sdpa), the model on meta, one image in a chat prompt: random ids for the
    template's words (ordinary tokens, below the first special one) and random patches."""
    config = transformers.Qwen2VLConfig.from_dict(scale.qwen)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Qwen2VLModel(config)
    (t, h, w), vision = scale.qwen_grid_thw, config.vision_config
    generator, bos = torch.Generator().manual_seed(0), config.text_config.bos_token_id
    words = [torch.randint(0, bos, (count,), generator=generator) for count in (13, 11)]
    merged = t * h * w // vision.spatial_merge_size**2
    image = [config.vision_start_token_id, *[config.image_token_id] * merged]
    image = torch.tensor([*image, config.vision_end_token_id])
    # 13 + 2 + 11 template tokens: the a100x8 preset's plan.image_prompt_extra_tokens (26).
    ids = torch.cat([words[0], image, words[1]])[None]
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(t * h * w, channels, generator=generator).bfloat16()
    batch = (ids, torch.ones_like(ids), (ids == config.image_token_id).int(), pixels)
    batch += (torch.tensor([[t, h, w]]),)
    return config, model, qwen2vl_tail.PromptBatch(*(tensor.to(scale.device) for tensor in batch))


def measure_qwen_encode(scale: Scale) -> list[Row]:
    config, prefix, batch = qwen_on_meta(scale)
    qwen2vl_tail.drop_last_layer(prefix)
    prefix = materialise(prefix, scale.device, lambda parameter: torch.bfloat16).eval()
    with torch.inference_mode():
        seconds = seconds_per_call(lambda: qwen2vl_tail.run_prefix(prefix, batch), scale)
    # FLOPs: 2 x params x tokens (vision blocks on patches, the merger's MLP on merged tokens,
    # decoder layers on the prompt; the embedding lookup counts zero) + 4 N^2 width attention.
    count = lambda module: sum(parameter.numel() for parameter in module.parameters())  # noqa: E731
    patches, length = batch.pixel_values_PC.shape[0], batch.input_ids_BL.shape[1]
    vision, layers = prefix.visual, prefix.language_model.layers
    merged = patches // vision.config.spatial_merge_size**2
    linear = (count(vision) - count(vision.merger)) * patches + count(vision.merger) * merged
    attention = len(vision.blocks) * patches**2 * vision.config.embed_dim
    attention += len(layers) * length**2 * layers[0].self_attn.q_proj.out_features
    flops = 2 * (linear + count(layers) * length) + 4 * attention
    (t, h, w), side = scale.qwen_grid_thw, config.vision_config.patch_size
    notes = f"vision + layers 0..{len(prefix.language_model.layers) - 1} in bf16; {w * side}x"
    notes += f"{h * side} px ({t * h * w} patches), {batch.input_ids_BL.shape[1]} tokens; analytic"
    return [throughput_row("qwen_encode", scale, 1 / seconds, flops, notes)]


def measure_vae_encode(scale: Scale) -> list[Row]:
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**scale.vae)
    vae = materialise(vae, scale.device, lambda parameter: torch.bfloat16).eval()
    side, batch = scale.vae_pixels, scale.vae_batch
    images = torch.randn(batch, 3, side, side, device=scale.device, dtype=torch.bfloat16)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            vae.encode(images)
        seconds = seconds_per_call(lambda: vae.encode(images), scale, warmup=1)
    notes = f"encoder at {side}x{side} px in bf16, batch {batch}; FLOPs by FlopCounterMode"
    flops = counter.get_total_flops() / batch
    return [throughput_row("vae_encode", scale, batch / seconds, flops, notes)]


def throughput_row(name: str, scale: Scale, images_per_s: float, flops: float, notes: str) -> Row:
    """images/s beside the FLOP bound: the card's peak / FLOPs per image."""
    bound = scale.peak_tflops * 1e12 / flops if scale.peak_tflops else None
    reference = f"{bound:.4g} images/s FLOP bound" if bound else NO_PEAK
    notes += f"; {flops / 1e12:.4g} TFLOP/image"
    return Row(name, f"{images_per_s:.4g} images/s", reference, ratio(images_per_s, bound), notes)


def measure_tail_replay(scale: Scale) -> list[Row]:
    """bf16 autocast replay against fp32 on one image prompt's random penultimate states."""
    config, model, batch = qwen_on_meta(scale)
    positions = qwen2vl_tail.multimodal_position_ids(model, batch)  # reads only the config
    tail = qwen2vl_tail.Qwen2VLTail.skeleton(config.text_config)
    tail = materialise(tail, scale.device, lambda parameter: torch.float32).eval()
    shape = (*batch.input_ids_BL.shape, config.text_config.hidden_size)
    hidden = torch.randn(shape, device=scale.device).bfloat16().float()  # cached states are bf16
    inputs = {"position_ids_3BL": positions, "attention_mask_BL": batch.attention_mask_BL}
    with torch.inference_mode():
        reference = qwen2vl_tail.replay_last_layer(tail, hidden, **inputs).double()
        with torch.autocast(scale.device.type, dtype=torch.bfloat16):
            replayed = qwen2vl_tail.replay_last_layer(tail, hidden, **inputs).double()
    relative = float((replayed - reference).norm() / reference.norm())
    measured = f"relative {relative:.3g}, max abs {float((replayed - reference).abs().max()):.3g}"
    tolerance, precision = REPLAY_RELATIVE_TOLERANCE, torch.get_float32_matmul_precision()
    passed, bound = relative <= tolerance, f"relative <= {tolerance:g}"
    notes = f"{'pass' if passed else 'FAIL'}; {shape[1]} tokens; fp32 matmuls {precision}"
    return [Row("tail_replay", measured, bound, ratio(relative, tolerance), notes, not passed)]


MEASUREMENTS: dict[str, tuple[Callable[[Scale], list[Row]], tuple[str, ...]]] = {
    "double_block": (lambda scale: measure_block(scale, double=True), ("double_block",)),
    "single_block": (lambda scale: measure_block(scale, double=False), ("single_block",)),
    "stage1": (measure_stage, ("stage1_memory", "stage1_step")),
    "qwen_encode": (measure_qwen_encode, ("qwen_encode",)),
    "vae_encode": (measure_vae_encode, ("vae_encode",)),
    "tail_replay": (measure_tail_replay, ("tail_replay",)),
}
"""Measurement name (what --only takes) -> (its function, the table rows it prints)."""


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_measurement(name: str, scale: Scale) -> list[Row]:
    """The measurement's rows, or an error row for each of them if it raised."""
    function, row_names = MEASUREMENTS[name]
    try:
        return function(scale)
    except Exception as error:  # noqa: BLE001 - each measurement reports its own failure
        traceback.print_exc(file=sys.stderr)
        message = f"error: {type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
        return [Row(row, message[:300], failed=True) for row in row_names]
    finally:
        free_memory(scale.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU")
    parser.add_argument("--only", action="append", choices=list(MEASUREMENTS))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card")
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    # A trainable block's fp32 RMSNorm scale on bf16 activations warns on every call.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    if not (args.smoke or torch.cuda.is_available()):
        print("no CUDA device: --smoke runs the same code at toy size on CPU", file=sys.stderr)
        return 2
    card = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    matches = (key for key in PEAK_BF16_TFLOPS if all(part in card.upper() for part in key.split()))
    peak = args.peak_tflops or PEAK_BF16_TFLOPS.get(next(matches, ""))
    device = torch.device("cpu" if args.smoke else "cuda")
    scale = build_scale(device, smoke=args.smoke, steps=args.steps, peak=peak)
    started, rows, timings = time.perf_counter(), [], []
    for name in args.only or MEASUREMENTS:
        part_started = time.perf_counter()
        rows += run_measurement(name, scale)
        timings.append(f"{name} {time.perf_counter() - part_started:.1f} s")
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
    print(f"card: {card}; bf16 peak TFLOP/s {peak or 'n/a'}; {versions}{transformers.__version__}")
    print("\n| row | measured | reference / bound | ratio | notes |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.measured} | {row.reference} | {row.ratio} | {row.notes} |")
    print(f"\nwall time: {', '.join(timings)}; total {time.perf_counter() - started:.1f} s")
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
