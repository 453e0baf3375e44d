"""FLUX block indexing and the report's three progressive stages.

Block index i addresses FLUX's 57 blocks in forward order: i < 19 is double-stream block i
(`transformer_blocks[i]`), else single-stream block i - 19 (`single_transformer_blocks[i - 19]`).
Each stage trains exactly its listed blocks, plus (outside FLUX) the connector and Qwen2-VL's last
decoder layer; every other FLUX parameter is frozen. Stages choose blocks by index, never by
branching on the stage number.
"""

from __future__ import annotations

from torch import nn

STAGE_BLOCKS: dict[int, tuple[int, ...]] = {
    1: (1, 4, 7, 12, 16, 19, 24, 28, 32, 37, 40, 44, 48, 52, 56),
    2: (0, 3, 6, 9, 14, 16, 21, 26, 30, 34, 39, 42, 46, 50, 54, 56),
    3: (2, 5, 8, 11, 15, 18, 23, 25, 29, 33, 36, 41, 45, 49, 53, 55),
}
"""Trainable FLUX blocks per stage, from the Qwen2VL-Flux technical report."""


def num_blocks(transformer: nn.Module) -> int:
    """Double + single stream blocks of a FluxTransformer2DModel."""
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def block_prefix(transformer: nn.Module, index: int) -> str:
    """Parameter-name prefix of block `index` (e.g. `single_transformer_blocks.0.`)."""
    num_double = len(transformer.transformer_blocks)
    if not 0 <= index < num_blocks(transformer):
        raise IndexError(f"FLUX block index {index} outside 0..{num_blocks(transformer) - 1}")
    if index < num_double:
        return f"transformer_blocks.{index}."
    return f"single_transformer_blocks.{index - num_double}."


def flux_block(transformer: nn.Module, index: int) -> nn.Module:
    """The module of block `index`."""
    num_double = len(transformer.transformer_blocks)
    if index < num_double:
        return transformer.transformer_blocks[index]
    return transformer.single_transformer_blocks[index - num_double]


def trainable_parameter_names(transformer: nn.Module, indices: tuple[int, ...]) -> list[str]:
    """Names of the parameters of blocks `indices`, in the module's order."""
    prefixes = tuple(block_prefix(transformer, index) for index in indices)
    return [name for name, _ in transformer.named_parameters() if name.startswith(prefixes)]


def select_trainable_blocks(transformer: nn.Module, indices: tuple[int, ...]) -> int:
    """Freeze every FLUX parameter except blocks `indices`; returns the trainable count."""
    trainable = set(trainable_parameter_names(transformer, indices))
    count = 0
    for name, parameter in transformer.named_parameters():
        parameter.requires_grad_(name in trainable)
        count += parameter.numel() if name in trainable else 0
    return count
