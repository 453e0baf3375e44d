"""The training loop in one process without Ray: its per-step losses equal the golden file's,
and a resume from any checkpoint it published continues with the same losses."""

import shutil
from pathlib import Path

import pytest
import torch
from golden_losses import GOLDEN_FILE, golden_lines, read_golden, run_in_process

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def straight_run(tiny_data_run, tiny_models_dir, make_tiny_config, tmp_path_factory):
    """The tiny preset's three short stages run once, every published checkpoint kept."""
    data_config, _ = tiny_data_run
    root = Path(data_config.run.root) / "data"
    config = make_tiny_config(tmp_path_factory.mktemp("golden"), tiny_models_dir)
    kept = tmp_path_factory.mktemp("published")
    published = []

    def publish(folder, metrics):
        copy = kept / f"stage{metrics['stage_index']}-step{metrics['next_step']}"
        shutil.copytree(folder, copy)
        published.append((int(metrics["stage_index"]), int(metrics["next_step"]), copy))

    losses, loop = run_in_process(config, dataset_root=root, publish=publish)
    return config, root, losses, published


def test_losses_match_the_golden_file(straight_run):
    config, _, losses, _ = straight_run
    golden = read_golden()
    assert [(name, step) for name, step, _ in golden] == [
        (line.split()[0], int(line.split()[1])) for line in golden_lines(config, losses)
    ], f"{GOLDEN_FILE} covers other stages or steps: regenerate it on purpose (make golden)"
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor([loss for *_, loss in golden], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-7,
    )


def test_every_stage_publishes_its_cadence_and_its_end(straight_run):
    config, _, _, published = straight_run
    every = config.train.checkpoint_every_steps
    expected = [
        (index, step)
        for index, stage in enumerate(config.train.stages)
        for step in range(1, stage.num_steps + 1)
        if step % every == 0 or step == stage.num_steps
    ]
    assert [(index, step) for index, step, _ in published] == expected


def test_resume_from_a_mid_stage_checkpoint_continues_the_same_losses(straight_run):
    config, root, losses, published = straight_run
    stage_index, next_step, folder = next(item for item in published if item[0] == 1)
    assert next_step < config.train.stages[1].num_steps
    done = sum(stage.num_steps for stage in config.train.stages[:stage_index]) + next_step
    resumed, _ = run_in_process(config, dataset_root=root, resume=folder)
    assert resumed == losses[done:]
