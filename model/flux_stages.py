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


FLUX_PARTS = ("attention", "mlp", "output", "modulation", "norms")
"""The parts of a FLUX block a stage can train (`flux_parts`; "all" = every one):
attention  q/k/v (and the text stream's) projections, the double block's output projections
mlp        the feed-forward networks (double: ff, ff_context; single: proj_mlp)
output     a single block's proj_out, the one projection that merges its attention and MLP
modulation the adaptive-norm linears that make shift/scale/gate from the timestep embedding
norms      the RMS norms of queries and keys (the block's LayerNorms have no parameters)"""


def block_part(name: str) -> str:
    """The part (FLUX_PARTS) of a parameter, by its name inside a double or single block."""
    if name.startswith(("norm1.", "norm1_context.", "norm.")):
        return "modulation"
    if name.startswith("attn.norm_"):
        return "norms"
    if name.startswith("attn."):
        return "attention"
    if name.startswith(("ff.", "ff_context.", "proj_mlp.")):
        return "mlp"
    if name.startswith("proj_out."):
        return "output"
    raise ValueError(f"FLUX block parameter {name!r} belongs to no known part")


def flux_parameter_group(name: str, *, num_double: int) -> tuple[str, str]:
    """(block label, part) of a transformer parameter: the block index as text ("0".."56") and
    its part, or the top-level module (x_embedder, time_text_embed, ...) and "-" outside."""
    for stream, offset in (("transformer_blocks.", 0), ("single_transformer_blocks.", num_double)):
        if name.startswith(stream):
            number, inner = name[len(stream) :].split(".", 1)
            return str(int(number) + offset), block_part(inner)
    return name.split(".", 1)[0], "-"


def check_parts(parts: tuple[str, ...]) -> tuple[str, ...]:
    """`parts` as a stage gives them: ("all",) or distinct FLUX_PARTS; ValueError otherwise."""
    if tuple(parts) == ("all",):
        return FLUX_PARTS
    unknown = sorted(set(parts) - set(FLUX_PARTS))
    if not parts or unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"flux_parts must be ['all'] or distinct names from {list(FLUX_PARTS)}, "
            f"got {list(parts)}"
        )
    return tuple(parts)


def trainable_parameter_names(
    transformer: nn.Module, indices: tuple[int, ...], parts: tuple[str, ...] = ("all",)
) -> list[str]:
    """Names of the parameters of blocks `indices` in `parts`, in the module's order."""
    wanted = check_parts(parts)
    num_double = len(transformer.transformer_blocks)
    blocks = {str(index) for index in indices}
    prefixes = tuple(block_prefix(transformer, index) for index in indices)
    names = []
    for name, _ in transformer.named_parameters():
        if name.startswith(prefixes):
            block, part = flux_parameter_group(name, num_double=num_double)
            if block in blocks and part in wanted:
                names.append(name)
    return names


def select_trainable_blocks(
    transformer: nn.Module, indices: tuple[int, ...], parts: tuple[str, ...] = ("all",)
) -> int:
    """Freeze every FLUX parameter except `parts` of blocks `indices`; returns the trainable
    count."""
    trainable = set(trainable_parameter_names(transformer, indices, parts))
    count = 0
    for name, parameter in transformer.named_parameters():
        parameter.requires_grad_(name in trainable)
        count += parameter.numel() if name in trainable else 0
    return count
