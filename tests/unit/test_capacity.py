"""The real-scale planner: parameter counts from the shipped public configs (meta device) against
ARCHITECTURE.md and against counts derived here from the configs' dims; memory and FLOPs maths.
How a preset becomes a plan (overrides, [plan], the CLI) is tests/unit/test_plan.py."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from components.training.capacity import (
    BlockShape,
    EncoderTailShape,
    FluxShape,
    TrainingSetup,
    check_block_indices,
    plan_stage,
)
from model.flux_stages import STAGE_BLOCKS
from pipelines.plan import REFERENCE_CONFIG_DIR, plan_preset

pytestmark = pytest.mark.unit

QWEN_CONFIG = json.loads((REFERENCE_CONFIG_DIR / "qwen2-vl-7b-instruct/config.json").read_text())
FLUX_CONFIG = json.loads((REFERENCE_CONFIG_DIR / "flux1-dev/transformer/config.json").read_text())
ARCHITECTURE_STAGE_PARAMS = {1: 3.115e9, 2: 3.455e9, 3: 3.455e9}


@pytest.fixture(scope="module")
def report():
    return plan_preset("a100x8")


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _expected_flux_blocks() -> tuple[int, int]:
    """Double and single block sizes from the FLUX config's dims (diffusers' block layout)."""
    head_dim = FLUX_CONFIG["attention_head_dim"]
    width = FLUX_CONFIG["num_attention_heads"] * head_dim
    stream = (
        _linear(width, 6 * width)  # adaLN-Zero modulation
        + 4 * _linear(width, width)  # q, k, v, out
        + 2 * head_dim  # q/k RMSNorm
        + _linear(width, 4 * width)
        + _linear(4 * width, width)
    )
    single = (
        _linear(width, 3 * width)
        + 3 * _linear(width, width)
        + 2 * head_dim
        + _linear(width, 4 * width)
        + _linear(5 * width, width)
    )
    return 2 * stream, single


def _expected_qwen_last_layer() -> int:
    hidden, mlp = QWEN_CONFIG["hidden_size"], QWEN_CONFIG["intermediate_size"]
    head_dim = hidden // QWEN_CONFIG["num_attention_heads"]
    kv_width = QWEN_CONFIG["num_key_value_heads"] * head_dim
    attention = _linear(hidden, hidden) + 2 * _linear(hidden, kv_width) + hidden * hidden
    return attention + 3 * hidden * mlp + 2 * hidden


def test_shipped_configs_are_the_public_dims():
    assert (QWEN_CONFIG["hidden_size"], QWEN_CONFIG["num_hidden_layers"]) == (3584, 28)
    assert QWEN_CONFIG["rope_scaling"]["mrope_section"] == [16, 24, 24]
    assert QWEN_CONFIG["vision_config"]["depth"] == 32
    assert (FLUX_CONFIG["num_layers"], FLUX_CONFIG["num_single_layers"]) == (19, 38)
    assert FLUX_CONFIG["joint_attention_dim"] == 4096 and FLUX_CONFIG["guidance_embeds"] is True
    assert (REFERENCE_CONFIG_DIR / "README.md").is_file()


def test_whole_qwen2vl_builds_on_meta_at_its_public_size():
    config = Qwen2VLConfig.from_pretrained(REFERENCE_CONFIG_DIR / "qwen2-vl-7b-instruct")
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert round(sum(parameter.numel() for parameter in model.parameters()) / 1e9, 2) == 8.29


def test_block_counts_match_config_dims_and_architecture(report):
    double, single = _expected_flux_blocks()
    assert report.flux.double_block.num_params == double
    assert report.flux.single_block.num_params == single
    assert round(double / 1e6, 1) == 339.8 and round(single / 1e6, 1) == 141.6
    assert round(report.flux.num_params / 1e9, 2) == 11.90
    assert report.flux.num_blocks == 57


def test_stage_counts_match_architecture(report):
    stages = {stage.number: stage.plan for stage in report.stages}
    assert sorted(stages) == [1, 2, 3]
    for number, expected in ARCHITECTURE_STAGE_PARAMS.items():
        assert stages[number].trainable_flux_params == pytest.approx(expected, rel=1e-3)
        assert stages[number].trainable_blocks == STAGE_BLOCKS[number]
    assert report.distinct_blocks == 45


def test_encoder_side_matches_config_dims(report):
    hidden, joint = QWEN_CONFIG["hidden_size"], FLUX_CONFIG["joint_attention_dim"]
    assert report.tail.connector_params == hidden * joint + joint == 14_684_160
    assert report.tail.layer_params == _expected_qwen_last_layer()
    assert report.tail.layer_params == pytest.approx(233e6, rel=5e-3)
    assert report.tail.norm_params == hidden


def test_reference_run_fits_with_fsdp_only(report):
    capacity = report.setup.device_memory_gib * 1024**3
    for stage in report.stages:
        assert stage.plan.fsdp.fits(capacity) and not stage.plan.ddp.fits(capacity)
        assert stage.plan.backward_blocks == (0, 56)
    assert sum(stage.plan.num_steps for stage in report.stages) == 100_000
    # The report: 100K updates in "about one month" (the preset splits them over the stages).
    assert 20 < sum(stage.plan.days for stage in report.stages) < 45


def _shapes() -> tuple[FluxShape, EncoderTailShape]:
    block = BlockShape(
        num_params=1000, image_token_params=400, text_token_params=400, saved_values_per_token=30
    )
    flux = FluxShape(
        hidden_size=8,
        num_double_blocks=2,
        num_single_blocks=3,
        double_block=block,
        single_block=replace(block, num_params=500),
        num_params=5000,
    )
    tail = EncoderTailShape(
        hidden_size=6,
        attention_width=6,
        layer_params=300,
        norm_params=6,
        saved_values_per_token=40,
        connector_width=8,
    )
    return flux, tail


def test_fsdp_is_below_ddp_and_shards_scale_inverse_with_gpus():
    flux, tail = _shapes()
    four = TrainingSetup(num_workers=4, micro_batch=4, grad_accum=2)
    eight = TrainingSetup(num_workers=8, micro_batch=4, grad_accum=2)
    small = plan_stage(flux, tail, four, (1, 3), num_steps=10)
    large = plan_stage(flux, tail, eight, (1, 3), num_steps=10)
    assert small.fsdp.total < small.ddp.total
    for part in ("weights", "grads", "optimizer"):
        assert getattr(small.fsdp, part) == pytest.approx(2 * getattr(large.fsdp, part))
        assert getattr(small.ddp, part) == getattr(large.ddp, part)
    trainable = small.trainable_params
    assert small.ddp.optimizer == 8 * trainable and small.ddp.grads == 4 * trainable


def test_frozen_blocks_skip_weight_grads_and_conditioning_opens_the_whole_path():
    flux, tail = _shapes()
    setup = TrainingSetup(num_workers=1, micro_batch=2, grad_accum=1, image_tokens=4, text_tokens=2)
    with_conditioning = plan_stage(flux, tail, setup, (3,), num_steps=1)
    flux_only = plan_stage(flux, tail, setup, (3,), num_steps=1, trains_conditioning=False)
    assert with_conditioning.backward_blocks == (0, 4) and flux_only.backward_blocks == (3, 4)
    linear = 2 * (400 * 4 + 400 * 2) * setup.global_batch
    assert flux_only.flops.backward_weight == linear
    assert flux_only.flops.model < with_conditioning.flops.model
    assert flux_only.ddp.activations < with_conditioning.ddp.activations


@pytest.mark.parametrize("indices", [(57,), (-1,), (), (3, 3)])
def test_rejects_bad_block_indices(indices):
    flux, tail = _shapes()
    big_flux = replace(flux, num_double_blocks=19, num_single_blocks=38)
    with pytest.raises(ValueError):
        check_block_indices(big_flux, indices)
    with pytest.raises(ValueError):
        plan_stage(big_flux, tail, TrainingSetup(), indices, num_steps=1)


def test_setup_derives_the_global_batch_and_rejects_bad_values():
    assert TrainingSetup(num_workers=8, micro_batch=8, grad_accum=2).global_batch == 128
    with pytest.raises(ValueError, match="micro_batch"):
        TrainingSetup(micro_batch=0)
    with pytest.raises(ValueError, match="mfu"):
        TrainingSetup(mfu=0.0)
    flux, tail = _shapes()
    with pytest.raises(ValueError, match="num_steps"):
        plan_stage(flux, tail, TrainingSetup(), (1,), num_steps=0)


def test_days_follow_the_stage_steps():
    flux, tail = _shapes()
    short = plan_stage(flux, tail, TrainingSetup(), (1,), num_steps=1_000)
    long = plan_stage(flux, tail, TrainingSetup(), (1,), num_steps=4_000)
    assert long.step_seconds == short.step_seconds
    assert long.days == pytest.approx(4 * short.days)


def test_checkpointing_and_precision_change_activations_and_recompute():
    flux, tail = _shapes()
    base = TrainingSetup(num_workers=1, micro_batch=2, grad_accum=1, image_tokens=4, text_tokens=2)
    checkpointed = plan_stage(flux, tail, base, (3,), num_steps=1)
    kept = plan_stage(flux, tail, replace(base, gradient_checkpointing=False), (3,), num_steps=1)
    fp32 = plan_stage(flux, tail, replace(base, compute_bf16=False), (3,), num_steps=1)
    assert checkpointed.flops.recompute > 0 and kept.flops.recompute == 0
    assert kept.flops.model == checkpointed.flops.model
    # Path 0..4: 5 blocks x 30 saved values per token, against 5 inputs x width 8 + one block's 30.
    assert kept.ddp.activations > checkpointed.ddp.activations
    assert fp32.ddp.activations == 2 * checkpointed.ddp.activations
    assert fp32.ddp.working == 0 and checkpointed.ddp.working == 2 * checkpointed.trainable_params


def test_encoder_prompts_are_replayed_separately():
    flux, tail = _shapes()
    one = TrainingSetup(encoder_prompt_tokens=(40,))
    two = TrainingSetup(encoder_prompt_tokens=(20, 20))
    joint, split = (plan_stage(flux, tail, setup, (1,), num_steps=1) for setup in (one, two))
    assert split.encoder_tokens_per_step == joint.encoder_tokens_per_step
    assert split.ddp.activations == joint.ddp.activations
    # Causal attention per prompt: 2 x 20^2 < 40^2.
    assert split.flops.forward < joint.flops.forward
