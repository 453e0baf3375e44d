"""FSDP2 for the trained model, and moving its state between workers and checkpoints.

`shard_model` wraps every FLUX block, the Qwen2-VL tail, the connector (and on the T5 text branch
the t5_embedder) as one FSDP2 unit each (`torch.distributed.fsdp.fully_shard`), and the FLUX
transformer as the unit of what is left (embedders, output head). The step calls tail, connector
(t5_embedder) and transformer in turn: each is an FSDP root. Every parameter becomes a DTensor
sharded on dim 0 over the workers; a unit is all-gathered just before its forward / backward and
freed after, so a worker holds 1/N of the weights, gradients and AdamW states plus about one unit in
full. With `compute_bf16` the all-gathers run in bf16 and gradients are reduce-scattered in fp32
(MixedPrecisionPolicy); the sharded masters stay fp32.

Checkpoints keep each worker's shards (components/training/distributed_checkpoint.py); the
full-tensor loaders here read format-2 checkpoints (full tensors and a name-keyed AdamW state),
sharded or not. Every worker must call them (they are collectives under FSDP).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from components.training.objective import QwenFluxModel
from model.flux_stages import flux_block, num_blocks


def shard_model(model: QwenFluxModel, *, device: torch.device, compute_bf16: bool) -> None:
    """Apply FSDP2 in place: one unit per FLUX block, the transformer's rest, tail, connector.

    Call it on the model as loaded (on the CPU): each unit moves to `device` as it is sharded,
    so a GPU never holds more than the shards plus one whole unit (a 12B fp32 FLUX would not
    fit one 80 GB card whole)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if compute_bf16 else None,
        reduce_dtype=torch.float32 if compute_bf16 else None,
    )
    for index in range(num_blocks(model.transformer)):
        fully_shard(flux_block(model.transformer, index), mesh=mesh, mp_policy=policy)
    units = [model.transformer, model.tail, model.connector]
    if model.t5_embedder is not None:
        units.append(model.t5_embedder)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)


def _roots(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.children() if isinstance(module, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(_roots(model))


def set_gradient_sync(model: nn.Module, *, enabled: bool) -> None:
    """Under FSDP, reduce-scatter gradients only on the last micro-batch of a step."""
    for root in _roots(model):
        root.set_requires_gradient_sync(enabled)


def reshard(model: nn.Module) -> None:
    """Free the gathered weights a root unit keeps after a forward without backward (validation,
    sampling), so the module holds its shards, the parameters the optimizer knows, again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered if it is a DTensor shard)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def load_parameters(model: nn.Module, weights: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy full tensors into the named parameters (each worker keeps its own shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    parameters = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(parameters))
    if unknown:
        raise KeyError(f"{source}: unknown parameters {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            param = parameters[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model has {tuple(param.shape)}"
                )
            if isinstance(param, DTensor):
                local = distribute_tensor(
                    tensor.to(param.device, param.dtype),
                    param.device_mesh,
                    param.placements,
                    src_data_rank=None,
                )
                param.copy_(local)
            else:
                param.copy_(tensor)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full, name-keyed optimizer state (every worker holds it; each keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    # strict=False: a parameter that never got a gradient (every step so far skipped by the
    # guard, or off the loss path) has no AdamW state yet, exactly as in the saved run.
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)
