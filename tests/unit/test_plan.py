"""`qwenflux plan`: a preset goes through the strict loader and its own stages, resources and
[plan] assumptions are what gets planned (pipelines/plan.py)."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel

from components.training.objective import ObjectiveConfig
from model.presets import tiny_flux_transformer_kwargs, tiny_qwen2vl_config
from pipelines.cli import main
from pipelines.config import CONFIG_DIR, load_config
from pipelines.config_loading import ConfigError
from pipelines.plan import flux_text_tokens, plan_preset, training_setup

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def reference():
    return plan_preset("a100x8")


def _stages(report) -> dict:
    return {stage.number: stage.plan for stage in report.stages}


def test_set_overrides_change_the_plan(reference):
    edited = plan_preset(
        "a100x8",
        [
            "train.resources.num_workers=4",
            "train.stages.1.num_steps=5000",
            "train.stages.2.flux_blocks=[0, 1]",
        ],
    )
    assert (reference.setup.global_batch, edited.setup.global_batch) == (128, 64)
    before, after = _stages(reference), _stages(edited)
    # FSDP shards over half the workers: twice the weight shard per GPU.
    assert after[1].fsdp.weights == pytest.approx(2 * before[1].fsdp.weights)
    assert after[1].num_steps == 5000 and after[2].trainable_blocks == (0, 1)
    assert after[3].trainable_blocks == before[3].trainable_blocks
    printed = edited.format()
    assert "global batch 64 = 4 GPUs x 8 x 2 accum" in printed
    assert "stage 1 (stage1, 5,000 steps)" in printed
    assert "stage 2 (stage2, 33,000 steps): FLUX blocks [0, 1]" in printed


def test_an_edited_preset_file_is_planned_as_written(tmp_path):
    text = (CONFIG_DIR / "a100x8.toml").read_text()
    for old, new in (
        ("num_workers = 8", "num_workers = 16"),
        ('strategy = "fsdp"', 'strategy = "ddp"'),
        ("micro_batch_size = 8", "micro_batch_size = 4"),
        ("mfu = 0.35", "mfu = 0.5"),
    ):
        assert text.count(old) == 1
        text = text.replace(old, new)
    preset = tmp_path / "edited.toml"
    preset.write_text(text)
    report = plan_preset(str(preset))
    printed = report.format()
    assert printed.startswith("preset: ") and "edited.toml" in printed.splitlines()[0]
    assert "strategy ddp" in printed
    assert "global batch 128 = 16 GPUs x 4 x 2 accum" in printed and "MFU 0.5" in printed
    ddp_lines = [line for line in printed.splitlines() if line.startswith("  ddp")]
    assert len(ddp_lines) == 3 and all("<- train.resources.strategy" in x for x in ddp_lines)
    assert "ddp DOES NOT FIT in stage 1, 2, 3" in printed


def test_days_come_from_each_stage_and_plan_mfu(reference):
    faster = plan_preset("a100x8", ["plan.mfu=0.7"])
    for number, stage in _stages(reference).items():
        assert stage.days == pytest.approx(stage.step_seconds * stage.num_steps / 86_400)
        assert _stages(faster)[number].days == pytest.approx(stage.days / 2)


def test_unknown_plan_key_is_rejected_naming_it(tmp_path):
    text = (CONFIG_DIR / "a100x8.toml").read_text()
    assert text.count("[plan]\n") == 1
    preset = tmp_path / "typo.toml"
    preset.write_text(text.replace("[plan]\n", "[plan]\ndevice_memory_gb = 80\n"))
    with pytest.raises(ConfigError, match="plan.device_memory_gb"):
        load_config(str(preset))
    with pytest.raises(ConfigError, match="mfu"):
        load_config("a100x8", ["plan.mfu=0"])


def test_presets_without_a_plan_section_get_the_defaults(tmp_path):
    text = (CONFIG_DIR / "tiny.toml").read_text()
    preset = tmp_path / "no_plan.toml"
    preset.write_text(text.split("\n[plan]\n")[0])
    assert load_config(str(preset)).plan.device_memory_gib == 80.0


def test_cli_plan_goes_through_the_strict_loader(capsys):
    assert main(["plan", "--set", "plan.nonexistent=1"]) == 2
    assert "plan.nonexistent" in capsys.readouterr().err
    assert main(["plan", "--config", "a100x8", "--set", "train.resources.num_workers=2"]) == 0
    printed = capsys.readouterr().out
    assert "2 GPUs x 80 GiB" in printed and "45 distinct" in printed
    with pytest.raises(SystemExit):
        main(["plan", "--gpus", "16"])


def test_a_checkpoint_the_plan_cannot_read_is_a_clear_error(capsys, tmp_path):
    assert main(["plan", "--set", "data.encode.qwen2vl=some/other-model"]) == 2
    error = capsys.readouterr().err
    assert "data.encode.qwen2vl" in error and "some/other-model" in error
    _tiny_model_configs(tmp_path)
    missing = tmp_path / "tiny-models" / "flux"
    overrides = [f"data.encode.qwen2vl={tmp_path / 'qwen2-vl'}", f"data.encode.flux={missing}"]
    assert main(["plan", "--config", "tiny", *(a for o in overrides for a in ("--set", o))]) == 2
    error = capsys.readouterr().err
    assert "data.encode.flux" in error and "qwenflux tiny-models" in error


def _tiny_model_configs(root):
    """Config files only (no weights) of the tiny checkpoints, in their real layouts."""
    tiny_qwen2vl_config().save_pretrained(root / "qwen2-vl")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**tiny_flux_transformer_kwargs())
    transformer.save_config(root / "flux" / "transformer")
    (root / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))


def test_tiny_preset_plans_the_checkpoints_it_names(tmp_path):
    _tiny_model_configs(tmp_path)
    overrides = [
        f"data.encode.qwen2vl={tmp_path / 'qwen2-vl'}",
        f"data.encode.flux={tmp_path / 'flux'}",
    ]
    report = plan_preset("tiny", overrides)
    assert report.flux.hidden_size == 64 and report.flux.num_blocks == 57
    assert report.tail.hidden_size == 16 and report.tail.connector_width == 32
    assert report.setup.image_tokens == 64  # 128 px bucket / 16 px per token, squared
    assert not report.setup.compute_bf16 and not report.setup.gradient_checkpointing
    printed = report.format()
    assert "2 CPU workers" in printed and "fp32 compute" in printed and "MiB" in printed
    assert [stage.plan.num_steps for stage in report.stages] == [200, 200, 200]


def test_text_tokens_follow_the_objective():
    image_only = ObjectiveConfig(
        image_only_probability=1.0, caption_only_probability=0.0, image_and_caption_probability=0.0
    )
    assert flux_text_tokens(image_only, image=512, caption=96)[0] == 512
    assert flux_text_tokens(ObjectiveConfig(), image=512, caption=96)[0] == 608
    assert flux_text_tokens(ObjectiveConfig(drop_rate=1.0), image=512, caption=96)[0] == 1


def test_resources_and_precision_come_from_the_preset():
    shared = load_config("a100x8", ["train.resources.gpus_per_worker=0.5"])
    setup, bucket, _ = training_setup(shared)
    assert setup.device_memory_gib == 40.0 and setup.peak_tflops == 156.0
    assert bucket.bucket_id == "1024x1024" and setup.encoder_prompt_tokens == (538, 96)
    fp32 = training_setup(load_config("a100x8", ["train.resources.mixed_precision=fp32"]))[0]
    assert setup.compute_bf16 and not fp32.compute_bf16
    small = training_setup(load_config("a100x8", ["data.buckets.max_side_px=512"]))[0]
    assert small.image_tokens == 1024


def test_flux_parts_count_only_the_parts_that_train(reference):
    """The report's stage 1 at full blocks, attention only and attention + MLP: the planner's
    counts by block shape agree with the names that train (plan_config checks both), and the
    gradients, AdamW state and weight-grad FLOPs shrink with them."""
    full = _stages(reference)[1]
    attention = _stages(plan_preset("a100x8", ['train.stages.1.flux_parts=["attention"]']))[1]
    report = plan_preset("a100x8", ['train.stages.1.flux_parts=["attention", "mlp"]'])
    both = _stages(report)[1]
    assert round(full.trainable_flux_params / 1e9, 3) == 3.115
    assert round(attention.trainable_flux_params / 1e9, 3) == 0.661
    assert round(both.trainable_flux_params / 1e9, 3) == 1.794
    assert attention.trainable_parts == ("attention",) and full.trainable_parts is None
    for smaller, larger in ((attention, both), (both, full)):
        assert smaller.fsdp.optimizer < larger.fsdp.optimizer
        assert smaller.ddp.grads < larger.ddp.grads
        assert smaller.flops.backward_weight < larger.flops.backward_weight
        assert smaller.flops.forward == larger.flops.forward
        assert smaller.backward_blocks == larger.backward_blocks == (0, 56)
    assert (
        "FLUX blocks [1, 4, 7, 12, 16, 19, 24, 28, 32, 37, 40, 44, 48, 52, 56], parts "
        "attention + mlp only" in report.format()
    )


def test_the_t5_branch_plans_its_embedder_and_tokens(reference):
    """train.text_branch = "t5": the t5_embedder (4096 x 3072 + 3072, its width from FLUX.1-dev's
    text_encoder_2 config) trains in every stage, 256 T5 tokens join every sample's text, and
    the Qwen2-VL layer replays the image prompt alone."""
    report = plan_preset("a100x8", ["train.text_branch=t5"])
    assert report.tail.t5_embedder_params == 4096 * 3072 + 3072
    assert report.setup.text_tokens == 512 + 256 and report.setup.t5_tokens == 256
    assert report.setup.encoder_prompt_tokens == (538,)
    t5_stage, qwen_stage = _stages(report)[1], _stages(reference)[1]
    assert t5_stage.trainable_params == qwen_stage.trainable_params + 4096 * 3072 + 3072
    assert t5_stage.flops.backward_weight > qwen_stage.flops.backward_weight
    assert "T5 embedder 12.6M" in report.format()
