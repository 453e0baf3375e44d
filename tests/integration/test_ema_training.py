"""EMA through the training loop (tiny preset, in process): the shadows are checkpointed and
restored, so a run resumed mid-stage ends with the same EMA as the straight run; validation on
the EMA weights runs; the EMA differs from the raw weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from golden_losses import run_in_process

from components.training.distributed_checkpoint import checkpoint_weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = (
    "train.ema.decay=0.8",
    "train.ema.start_step=2",
    "train.ema.validate_on=ema",
    "train.checkpoint_every_steps=2",
    "train.validate_every_steps=2",
    "train.stages.1.num_steps=3",
    "train.stages.2.num_steps=3",
    "train.stages.3.num_steps=1",
    "train.stages.1.warmup_steps=1",
    "train.stages.1.decay_steps=1",
    "train.stages.2.warmup_steps=1",
    "train.stages.2.decay_steps=1",
    "train.stages.3.warmup_steps=0",
    "train.stages.3.decay_steps=1",
)


def test_a_resumed_run_ends_with_the_straight_runs_ema(
    tiny_data_run, tiny_models_dir, make_tiny_config, tmp_path
):
    data_config, _ = tiny_data_run
    root = Path(data_config.run.root) / "data"
    config = make_tiny_config(tmp_path / "run", tiny_models_dir, *OVERRIDES)
    published = []

    def publish(folder, metrics):
        copy = tmp_path / f"s{int(metrics['stage_index'])}-{int(metrics['next_step'])}"
        shutil.copytree(folder, copy)
        published.append(copy)

    losses, _ = run_in_process(config, dataset_root=root, publish=publish)
    final = published[-1]
    middle = tmp_path / "s1-2"  # stage 2, after its second step (mid-stage)
    resumed_losses, loop = run_in_process(config, dataset_root=root, resume=middle)
    assert resumed_losses == losses[3 + 2 :]
    straight_ema = checkpoint_weights(final, ema=True)
    resumed_ema = {name: shadow for name, shadow in loop.average.shadows.items()}
    assert sorted(straight_ema) == sorted(resumed_ema)
    for name, shadow in straight_ema.items():
        assert torch.equal(shadow, resumed_ema[name]), name
    raw = checkpoint_weights(final)
    assert not torch.equal(raw["connector.weight"], straight_ema["connector.weight"])
