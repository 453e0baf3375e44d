"""Stage block selection on a FLUX with the real block count (tiny widths)."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

from model.flux_stages import (
    STAGE_BLOCKS,
    block_prefix,
    flux_block,
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
