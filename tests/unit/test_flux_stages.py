"""Stage block selection on a FLUX with the real block count (tiny widths)."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from model.flux_stages import (
    FLUX_PARTS,
    STAGE_BLOCKS,
    block_part,
    block_prefix,
    check_parts,
    flux_block,
    flux_parameter_group,
    num_blocks,
    select_trainable_blocks,
    trainable_parameter_names,
)
from model.presets import tiny_flux_transformer_kwargs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**tiny_flux_transformer_kwargs())


def test_report_lists_are_in_range_and_cover_45_blocks(transformer):
    assert num_blocks(transformer) == 57
    assert [len(STAGE_BLOCKS[stage]) for stage in (1, 2, 3)] == [15, 16, 16]
    assert len(set().union(*STAGE_BLOCKS.values())) == 45


def test_index_maps_double_then_single(transformer):
    assert block_prefix(transformer, 0) == "transformer_blocks.0."
    assert block_prefix(transformer, 18) == "transformer_blocks.18."
    assert block_prefix(transformer, 19) == "single_transformer_blocks.0."
    assert block_prefix(transformer, 56) == "single_transformer_blocks.37."
    assert flux_block(transformer, 20) is transformer.single_transformer_blocks[1]
    with pytest.raises(IndexError, match="57"):
        block_prefix(transformer, 57)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exactly_the_stage_blocks_train(transformer, stage):
    count = select_trainable_blocks(transformer, STAGE_BLOCKS[stage])
    trainable = {name for name, p in transformer.named_parameters() if p.requires_grad}
    assert trainable == set(trainable_parameter_names(transformer, STAGE_BLOCKS[stage]))
    blocks = {
        index
        for index in range(57)
        if any(name.startswith(block_prefix(transformer, index)) for name in trainable)
    }
    assert blocks == set(STAGE_BLOCKS[stage])
    assert count == sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    assert not any(
        name.startswith(("x_embedder", "context_embedder", "proj_out")) for name in trainable
    )


def test_every_block_parameter_has_one_part(transformer):
    parts = {}
    for name, _ in transformer.named_parameters():
        block, part = flux_parameter_group(name, num_double=19)
        if block.isdigit():
            parts.setdefault(int(block) < 19, set()).add(part)
    assert parts[True] == {"attention", "mlp", "modulation", "norms"}  # double blocks
    assert parts[False] == set(FLUX_PARTS)  # single blocks add proj_out, "output"
    assert flux_parameter_group("single_transformer_blocks.0.proj_out.weight", num_double=19) == (
        "19",
        "output",
    )
    assert flux_parameter_group("proj_out.weight", num_double=19) == ("proj_out", "-")
    with pytest.raises(ValueError, match="no known part"):
        block_part("adapter.weight")


def test_only_the_named_parts_of_the_stage_blocks_train(transformer):
    blocks = (1, 19)
    count = select_trainable_blocks(transformer, blocks, ("attention",))
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and count == sum(
        p.numel() for p in transformer.parameters() if p.requires_grad
    )
    for name in trainable:
        assert name.startswith(("transformer_blocks.1.attn.", "single_transformer_blocks.0.attn."))
        assert ".norm_" not in name  # q/k norms are their own part
    both = trainable_parameter_names(transformer, blocks, ("attention", "mlp"))
    assert set(trainable) < set(both) < set(trainable_parameter_names(transformer, blocks))
    assert trainable_parameter_names(transformer, blocks, ("all",)) == trainable_parameter_names(
        transformer, blocks, FLUX_PARTS
    )


@pytest.mark.parametrize(
    "parts", [(), ("attn",), ("attention", "attention"), ("all", "mlp")], ids=repr
)
def test_bad_parts_are_refused_naming_the_choices(parts):
    with pytest.raises(ValueError, match="flux_parts must be"):
        check_parts(parts)
