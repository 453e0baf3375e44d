"""FSDP2 (components/training/fsdp.py) against the unsharded model, in two real gloo processes.

Each process builds the tiny model from the checkpoints, trains the same steps twice (plain with
gradients all-reduced by hand, as DDP does; then sharded per block with FLUX's own gradient
checkpointing on) and checks: the losses and the updated weights agree, the gathered weights and
optimizer state of the sharded model equal the plain one's, and a distributed checkpoint of the
sharded model (each worker writes its own shards) restored into a fresh sharded model takes the
same next step. The blocks' q/k norms stay frozen,
so each trained unit mixes trainable and frozen parameters, as `flux_parts` makes it; the
T5 text branch's t5_embedder trains too, its tokens joining FLUX's text through the sharded
transformer.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

WORLD = 2
STEPS = 3
TRAINED_BLOCKS = (1, 19, 56)
T5_WIDTH = 8
"""The T5 text branch's input width here (its t5_embedder is one more FSDP unit)."""
TRAINED_PARTS = ("attention", "mlp", "output", "modulation")
"""Every part but the q/k norms: each trained FSDP unit mixes trainable and frozen parameters."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _build(models):
    from diffusers import FluxTransformer2DModel

    from components.training.encoder_tail import load_qwen2vl_tail
    from components.training.objective import QwenFluxModel
    from model.conditioning import Connector

    transformer = FluxTransformer2DModel.from_pretrained(models.flux, subfolder="transformer")
    tail = load_qwen2vl_tail(str(models.qwen2vl))
    torch.manual_seed(0)
    connector = Connector(tail.norm.weight.shape[0], transformer.config.joint_attention_dim)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    t5_embedder = torch.nn.Linear(T5_WIDTH, inner)
    return QwenFluxModel(tail, connector, transformer, t5_embedder)


def _loss(model, *, rank: int, step: int) -> torch.Tensor:
    from model.flux_forward import FluxConditioning, predict_velocity
    from model.latent_codec import latent_image_ids

    generator = torch.Generator().manual_seed(100 * step + rank)
    config = model.transformer.config
    hidden = torch.randn(2, 5, model.connector.in_features, generator=generator)
    latents = torch.randn(2, 16, config.in_channels, generator=generator)
    target = torch.randn(latents.shape, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t5_states = torch.randn(2, 4, T5_WIDTH, generator=generator)
    conditioning = FluxConditioning(
        model.connector(hidden),
        mask,
        torch.randn(2, config.pooled_projection_dim, generator=generator),
        torch.full((2,), 3.5),
        embedded_BUE=model.t5_embedder(t5_states),
        embedded_mask_BU=torch.tensor([[True] * 4, [False] * 4]),
    )
    velocity = predict_velocity(
        model.transformer,
        latents,
        image_ids_L3=latent_image_ids(8, width_latent=8),
        sigmas_B=torch.tensor([0.3, 0.8]),
        conditioning=conditioning,
    )
    return (velocity - target).square().mean()


def _train(model, optimizer, *, rank: int, steps: range, sharded: bool) -> list[float]:
    from components.training.fsdp import full_tensor

    losses = []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in steps:
        optimizer.zero_grad(set_to_none=False)
        loss = _loss(model, rank=rank, step=step)
        loss.backward()
        if not sharded:
            for param in params:
                if param.grad is None:  # the tail: not on this loss's path
                    continue
                dist.all_reduce(param.grad)
                param.grad /= WORLD
        total = loss.detach().clone()
        dist.all_reduce(total)
        full_tensor(torch.nn.utils.clip_grad_norm_(params, 0.05))
        optimizer.step()
        losses.append(float(total) / WORLD)
    return losses


def _stage(model):
    from components.training.optimizer import OptimizerConfig, build_optimizer
    from model.flux_stages import select_trainable_blocks

    select_trainable_blocks(model.transformer, TRAINED_BLOCKS, TRAINED_PARTS)
    for module in (model.tail, model.connector, model.t5_embedder):
        module.requires_grad_(True)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return build_optimizer(named, OptimizerConfig(learning_rate=1e-3))


def _worker(rank: int, port: int, models, results, folder) -> None:
    from fsdp_state import gather_optimizer_state, gather_parameters, merge_into

    from components.training.checkpoint_state import TrainState
    from components.training.distributed_checkpoint import (
        CheckpointWriter,
        checkpoint_entries,
        restore,
    )
    from components.training.fsdp import shard_model
    from model.flux_forward import set_gradient_checkpointing

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    try:
        plain = _build(models)
        plain_optimizer = _stage(plain)
        plain_losses = _train(plain, plain_optimizer, rank=rank, steps=range(STEPS), sharded=False)

        sharded = _build(models)
        set_gradient_checkpointing(sharded.transformer, enabled=True)
        shard_model(sharded, device=cpu, compute_bf16=False)
        sharded_optimizer = _stage(sharded)
        sharded_losses = _train(
            sharded, sharded_optimizer, rank=rank, steps=range(STEPS), sharded=True
        )
        everything = ("",)
        weights = gather_parameters(sharded, everything, rank=rank)
        optimizer_state = gather_optimizer_state(sharded, sharded_optimizer)
        plain_state = gather_optimizer_state(plain, plain_optimizer)

        # Each worker writes its own shards (DCP), merged into one folder as Ray Train merges
        # them; a fresh sharded model restored from it must take the original's next step.
        entries = checkpoint_entries(sharded, sharded_optimizer, everything)
        state = TrainState(0, STEPS, {"recent_norms": [], "skips": 0})
        CheckpointWriter(rank=rank).save(state, entries, {}, publish=merge_into(folder))
        dist.barrier()
        restored = _build(models)
        shard_model(restored, device=cpu, compute_bf16=False)
        restored_optimizer = _stage(restored)
        restore(folder, restored, restored_optimizer)
        next_step = range(STEPS, STEPS + 1)
        original_next = _train(sharded, sharded_optimizer, rank=rank, steps=next_step, sharded=True)
        restored_next = _train(
            restored, restored_optimizer, rank=rank, steps=next_step, sharded=True
        )
        if rank == 0:
            plain_weights = {name: p.detach().clone() for name, p in plain.named_parameters()}
            weight_gap = max(
                float((weights[name] - plain_weights[name]).abs().max()) for name in plain_weights
            )
            exp_avg_gap = max(
                float((optimizer_state["state"][name]["exp_avg"] - value["exp_avg"]).abs().max())
                for name, value in plain_state["state"].items()
            )
            results.put(
                {
                    "plain": plain_losses,
                    "sharded": sharded_losses,
                    "weight_gap": weight_gap,
                    "exp_avg_gap": exp_avg_gap,
                    "state_names": sorted(optimizer_state["state"]),
                    "plain_state_names": sorted(plain_state["state"]),
                    "original_next": original_next,
                    "restored_next": restored_next,
                }
            )
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_like_ddp_and_its_state_round_trips(tiny_models_dir, tmp_path):
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(
        _worker,
        args=(_free_port(), tiny_models_dir, results, tmp_path / "checkpoint"),
        nprocs=WORLD,
        start_method="spawn",
    )
    got = results.get(timeout=5)
    print(got["plain"], got["sharded"], got["weight_gap"], got["exp_avg_gap"])
    assert got["plain"][0] != got["plain"][-1], "training did not move the loss"
    for plain, sharded in zip(got["plain"], got["sharded"], strict=True):
        assert abs(plain - sharded) <= 1e-6
    assert got["weight_gap"] <= 1e-6
    assert got["exp_avg_gap"] <= 1e-6
    assert got["state_names"] == got["plain_state_names"]
    last_block = "transformer.single_transformer_blocks.37."
    assert any(name.startswith(last_block) for name in got["state_names"])
    assert not any(".attn.norm_" in name for name in got["state_names"])
    assert {"t5_embedder.weight", "t5_embedder.bias"} <= set(got["state_names"])
    assert got["original_next"] == got["restored_next"]
