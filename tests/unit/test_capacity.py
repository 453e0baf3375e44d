"""The real-scale planner: parameter counts from the shipped public configs (meta device) against
ARCHITECTURE.md and against counts derived here from the configs' dims; memory and FLOPs maths."""

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
from pipelines.cli import main
from pipelines.plan import REFERENCE_CONFIG_DIR, plan

pytestmark = pytest.mark.unit

QWEN_CONFIG = json.loads((REFERENCE_CONFIG_DIR / "qwen2-vl-7b-instruct/config.json").read_text())
FLUX_CONFIG = json.loads((REFERENCE_CONFIG_DIR / "flux1-dev/transformer/config.json").read_text())
ARCHITECTURE_STAGE_PARAMS = {1: 3.115e9, 2: 3.455e9, 3: 3.455e9}


@pytest.fixture(scope="module")
def report():
    return plan()


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
    stages = dict(report.stages)
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
    capacity = report.setup.gpu_memory_gib * 1024**3
    for _, stage in report.stages:
        assert stage.fsdp.fits(capacity) and not stage.ddp.fits(capacity)
        assert stage.backward_blocks == (0, 56)
        assert 20 < stage.days < 45  # the report: "about one month"


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
    small = plan_stage(flux, tail, TrainingSetup(num_gpus=4, global_batch=32), (1, 3))
    large = plan_stage(flux, tail, TrainingSetup(num_gpus=8, global_batch=32), (1, 3))
    assert small.fsdp.total < small.ddp.total
    for part in ("weights", "grads", "optimizer"):
        assert getattr(small.fsdp, part) == pytest.approx(2 * getattr(large.fsdp, part))
        assert getattr(small.ddp, part) == getattr(large.ddp, part)
    trainable = small.trainable_params
    assert small.ddp.optimizer == 8 * trainable and small.ddp.grads == 4 * trainable


def test_frozen_blocks_skip_weight_grads_and_conditioning_opens_the_whole_path():
    flux, tail = _shapes()
    setup = TrainingSetup(num_gpus=1, global_batch=2, grad_accum=1, image_tokens=4, text_tokens=2)
    with_conditioning = plan_stage(flux, tail, setup, (3,))
    flux_only = plan_stage(flux, tail, setup, (3,), trains_conditioning=False)
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
        plan_stage(big_flux, tail, TrainingSetup(), indices)


def test_setup_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="global_batch"):
        TrainingSetup(num_gpus=8, global_batch=100, grad_accum=2)


def test_cli_prints_the_plan(capsys, tmp_path):
    assert main(["plan", "--gpus", "16", "--global-batch", "256", "--mfu", "0.4"]) == 0
    printed = capsys.readouterr().out
    assert "16 GPUs" in printed and "stage 3" in printed and "45 distinct" in printed
    assert main(["plan", "--global-batch", "100"]) == 2
    preset = tmp_path / "elsewhere.toml"
    preset.write_text('[data.encode]\nqwen2vl = "some/other-model"\n')
    assert main(["plan", "--config", str(preset)]) == 2
    assert "some/other-model" in capsys.readouterr().err
