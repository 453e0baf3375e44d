"""The training step in-process on tiny models and the tiny dataset: the trainable set per
stage is exactly the report's, frozen parameters stay bit-identical, the loss can be driven
down, and the guard skips bad steps."""

from pathlib import Path

import pytest
import torch

from components.training.loader import BucketIndex, ShardReader, load_micro_batch
from components.training.loop import configure_stage
from components.training.model_loading import load_training_model
from components.training.objective import flow_matching_step_loss, step_generator
from components.training.optimizer import (
    GuardConfig,
    OptimizerConfig,
    StepGuard,
    TrainingDivergedError,
    build_optimizer,
)
from model.flux_stages import STAGE_BLOCKS, block_prefix
from pipelines.run_layout import with_absolute_paths

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tiny_data_run, tiny_models_dir, make_tiny_config, tmp_path_factory):
    data_config, _ = tiny_data_run
    root = Path(data_config.run.root) / "data"
    config = with_absolute_paths(make_tiny_config(tmp_path_factory.mktemp("loop"), tiny_models_dir))
    torch.set_num_threads(1)
    model, convention = load_training_model(config.data.encode, dataset_root=root, seed=0)
    index = BucketIndex.from_dataset(root)
    bucket = max(index.buckets.values(), key=lambda b: b.num_rows)
    batch = load_micro_batch(bucket.locate([0, 1]), reader=ShardReader())
    return config, model, convention, batch


def _loss(config, model, convention, batch, step):
    generator = step_generator(seed=0, stage_index=0, step=step, rank=0, micro=0)
    return flow_matching_step_loss(
        model, batch, objective=config.train.objective, convention=convention, generator=generator
    )


@pytest.mark.parametrize("stage_index", [0, 1, 2])
def test_only_the_stage_set_changes(setup, stage_index):
    config, model, convention, batch = setup
    stage = config.train.stages[stage_index]
    assert stage.flux_blocks == STAGE_BLOCKS[stage_index + 1]
    named = configure_stage(model, stage)
    prefixes = tuple(f"transformer.{block_prefix(model.transformer, b)}" for b in stage.flux_blocks)
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("tail.", "connector.", *prefixes))
    }
    assert {name for name, _ in named} == expected
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(named, OptimizerConfig(learning_rate=1e-3))
    for step in range(2):
        optimizer.zero_grad()
        _loss(config, model, convention, batch, step).backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= expected
    assert any(name.startswith("transformer.") for name in changed)
    assert {"connector.weight"} <= changed


def test_loss_is_deterministic_and_can_be_driven_down(setup):
    config, model, convention, batch = setup
    named = configure_stage(model, config.train.stages[0])
    optimizer = build_optimizer(named, OptimizerConfig(learning_rate=3e-3, weight_decay=0.0))
    with torch.no_grad():
        assert float(_loss(config, model, convention, batch, 0)) == float(
            _loss(config, model, convention, batch, 0)
        )
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = _loss(config, model, convention, batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"fixed batch, fixed draws: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.9 * losses[0]


def test_guard_skips_nonfinite_and_spikes_then_aborts():
    guard = StepGuard(GuardConfig(spike_factor=5.0, spike_window=10, max_consecutive_skips=2))
    assert [guard.judge(1.0, 1.0) for _ in range(5)] == ["ok"] * 5
    assert guard.judge(float("nan"), 1.0) == "nonfinite"
    assert guard.judge(1.0, 50.0) == "spike"
    assert guard.judge(1.0, 1.2) == "ok"
    guard.judge(float("inf"), 1.0)
    guard.judge(1.0, 100.0)
    with pytest.raises(TrainingDivergedError, match="3 consecutive"):
        guard.judge(float("nan"), 1.0)
