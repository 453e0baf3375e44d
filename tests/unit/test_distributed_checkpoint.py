"""Training checkpoints through torch.distributed.checkpoint, in one process: the batch layout's
slots, a save / restore round trip (weights, AdamW state, EMA), the asynchronous writer's copy,
format 2 read once more, and refusals by name. Multi-worker saving and resharding: the FSDP test
(tests/integration/test_fsdp.py) and the SIGKILL resume tests (test_train_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fsdp_state import merge_into

from components.training.checkpoint_state import (
    BatchLayout,
    CheckpointFormatError,
    TrainState,
    read_train_state,
)
from components.training.distributed_checkpoint import (
    CheckpointWriter,
    checkpoint_entries,
    checkpoint_weights,
    restore_train_state,
)
from components.training.optimizer import OptimizerConfig, build_optimizer
from model.ema import WeightAverage

STATE = TrainState(1, 3, {"recent_norms": [0.5], "skips": 0}, BatchLayout(2, 2))


def test_slots_split_the_runs_micro_batches_over_any_worker_count_that_divides_them():
    layout = BatchLayout(workers=2, accumulation_steps=2)
    assert layout.slots_of(0, 1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.slots_of(1, 2) == [(1, 0), (1, 1)]
    assert [layout.slots_of(rank, 4) for rank in range(4)] == [
        [(0, 0)],
        [(0, 1)],
        [(1, 0)],
        [(1, 1)],
    ]
    with pytest.raises(ValueError, match="2 workers x 2 accumulation steps = 4 micro-batches; 3"):
        layout.slots_of(0, 3)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 1)
        self.unused = torch.nn.Linear(2, 2)


def _trained(seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    model = Toy()
    named = [(n, p) for n, p in model.named_parameters()]
    optimizer = build_optimizer(named, OptimizerConfig(learning_rate=1e-2))
    for step in range(steps):
        _step(model, optimizer, step)
    return model, optimizer


def _step(model, optimizer, step: int) -> None:
    inputs = torch.Generator().manual_seed(100 + step)
    batch = torch.randn(5, 4, generator=inputs)
    optimizer.zero_grad()
    model.head(model.body(batch)).square().mean().backward()  # `unused` gets no gradient
    optimizer.step()


def _fresh():
    torch.manual_seed(7)
    model = Toy()
    named = [(n, p) for n, p in model.named_parameters()]
    return model, build_optimizer(named, OptimizerConfig(learning_rate=1e-2))


def test_a_checkpoint_restores_weights_adamw_and_ema_and_the_next_step_agrees(tmp_path):
    model, optimizer = _trained()
    average = WeightAverage(0.9)
    average.track(model.named_parameters())
    average.update(model.named_parameters())
    entries = checkpoint_entries(model, optimizer, ("body.", "head."), ema=average.shadows)
    assert "model.unused.weight" not in entries
    assert "optim.unused.weight.exp_avg" not in entries  # never had a gradient: no state
    CheckpointWriter(rank=0).save(STATE, entries, {}, publish=merge_into(tmp_path / "ckpt"))

    state = read_train_state(tmp_path / "ckpt")
    assert (state.stage_index, state.next_step, state.layout) == (1, 3, BatchLayout(2, 2))
    restored, restored_optimizer = _fresh()
    shadows = WeightAverage(0.9)
    shadows.track(restored.named_parameters())
    restore_train_state(state, restored, restored_optimizer, ema=shadows.shadows)
    for (name, param), (_, other) in zip(
        model.named_parameters(), restored.named_parameters(), strict=True
    ):
        if not name.startswith("unused"):
            assert torch.equal(param, other), name
            assert torch.equal(average.shadows[name], shadows.shadows[name]), name
    assert restored.unused.weight not in restored_optimizer.state
    _step(model, optimizer, 3)
    _step(restored, restored_optimizer, 3)
    assert torch.equal(model.body.weight, restored.body.weight)
    assert torch.equal(
        optimizer.state[model.head.weight]["exp_avg_sq"],
        restored_optimizer.state[restored.head.weight]["exp_avg_sq"],
    )
    weights = checkpoint_weights(tmp_path / "ckpt")
    assert sorted(weights) == ["body.bias", "body.weight", "head.bias", "head.weight"]
    assert torch.equal(
        checkpoint_weights(tmp_path / "ckpt", ema=True)["head.bias"], shadows.shadows["head.bias"]
    )


def test_an_asynchronous_save_writes_the_state_of_the_moment_it_was_called(tmp_path):
    model, optimizer = _trained()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    published = []
    writer = CheckpointWriter(rank=0, asynchronous=True)

    def publish(folder, metrics):
        merge_into(tmp_path / "ckpt")(folder, metrics)
        published.append(metrics["step"])

    writer.save(STATE, checkpoint_entries(model, optimizer, ("",)), {"step": 3.0}, publish=publish)
    _step(model, optimizer, 3)  # training goes on while the write runs
    writer.finish(publish)
    assert published == [3.0]
    weights = checkpoint_weights(tmp_path / "ckpt")
    assert all(torch.equal(weights[name], before[name]) for name in before)
    assert not torch.equal(model.body.weight, before["body.weight"])


def test_a_format_2_checkpoint_is_read_once_more(tmp_path):
    from checkpoint_files import write_legacy_checkpoint
    from fsdp_state import gather_optimizer_state

    model, optimizer = _trained()
    folder = write_legacy_checkpoint(tmp_path / "old", dict(model.named_parameters()))
    torch.save(gather_optimizer_state(model, optimizer), folder / "optimizer.pt")
    state = read_train_state(folder)
    assert (state.format, state.layout) == (2, None)
    restored, restored_optimizer = _fresh()
    restore_train_state(state, restored, restored_optimizer)
    _step(model, optimizer, 3)
    _step(restored, restored_optimizer, 3)
    assert torch.equal(model.body.weight, restored.body.weight)
    with pytest.raises(CheckpointFormatError, match="format 2.*before EMA"):
        restore_train_state(state, *_fresh(), ema={})


def test_other_formats_missing_files_and_foreign_entries_are_refused_by_name(tmp_path):
    model, optimizer = _trained()
    CheckpointWriter(rank=0).save(
        STATE, checkpoint_entries(model, optimizer, ("",)), {}, publish=merge_into(tmp_path / "c")
    )
    state_file = tmp_path / "c" / "state.json"
    payload = json.loads(state_file.read_text())
    state_file.write_text(json.dumps(payload | {"format": 1}))
    with pytest.raises(CheckpointFormatError, match="format 1; this trainer reads formats 2, 3"):
        read_train_state(tmp_path / "c")
    state_file.write_text(json.dumps(payload))
    (tmp_path / "c" / ".metadata").rename(tmp_path / "metadata")
    with pytest.raises(CheckpointFormatError, match="lacks .metadata"):
        read_train_state(tmp_path / "c")
    (tmp_path / "metadata").rename(tmp_path / "c" / ".metadata")

    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(4, 3)

    other = Other()
    optimizer = build_optimizer(list(other.named_parameters()), OptimizerConfig())
    with pytest.raises(CheckpointFormatError, match="'head.weight' is not a model parameter"):
        restore_train_state(read_train_state(tmp_path / "c"), other, optimizer)
    with pytest.raises(CheckpointFormatError, match="holds no EMA weights"):
        restore_train_state(read_train_state(tmp_path / "c"), *_fresh(), ema={})
    assert Path(tmp_path / "c" / "state.json").is_file()
