"""Prefix/replay maths on an in-memory tiny Qwen2-VL: replay equals the full model exactly."""

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from model import presets
from model.qwen2vl_tail import (
    PromptBatch,
    Qwen2VLTail,
    drop_last_layer,
    is_prefix_only,
    multimodal_position_ids,
    replay_last_layer,
    run_prefix,
)

pytestmark = pytest.mark.unit

IMAGE_PAD = presets.tiny_qwen2vl_token_id("<|image_pad|>")
VISION_START = presets.tiny_qwen2vl_token_id("<|vision_start|>")
VISION_END = presets.tiny_qwen2vl_token_id("<|vision_end|>")
PAD = presets.tiny_qwen2vl_token_id("<|endoftext|>")
# (t, h, w) patch grids of two aspect ratios: 16 and 6 merged image tokens.
GRIDS = ((1, 8, 8), (1, 4, 6))
PATCH_CHANNELS = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(presets.tiny_qwen2vl_config()).model.eval()


def _prompt_ids(grid: tuple[int, int, int], *, text_before: int, text_after: int) -> list[int]:
    num_image_tokens = grid[0] * grid[1] * grid[2] // 4
    generator = torch.Generator().manual_seed(text_before * 31 + text_after)
    before = torch.randint(20, 400, (text_before,), generator=generator).tolist()
    after = torch.randint(20, 400, (text_after,), generator=generator).tolist()
    return before + [VISION_START] + [IMAGE_PAD] * num_image_tokens + [VISION_END] + after


def _image_batch(*, padding_side: str) -> PromptBatch:
    rows = [
        _prompt_ids(GRIDS[0], text_before=5, text_after=4),
        _prompt_ids(GRIDS[1], text_before=3, text_after=7),
    ]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(0, len(row)) if padding_side == "right" else slice(length - len(row), length)
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    num_patches = sum(t * h * w for t, h, w in GRIDS)
    return PromptBatch(
        input_ids_BL=input_ids,
        attention_mask_BL=attention_mask,
        mm_token_type_ids_BL=(input_ids == IMAGE_PAD).int(),
        pixel_values_PC=torch.randn(num_patches, PATCH_CHANNELS, generator=torch.Generator()),
        image_grid_thw_N3=torch.tensor(GRIDS),
    )


def _full_run(model: torch.nn.Module, batch: PromptBatch):
    with torch.no_grad():
        return model(
            **batch.model_inputs(),
            output_hidden_states=True,
        )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_replay_equals_full_model_on_real_tokens(full_model, padding_side):
    batch = _image_batch(padding_side=padding_side)
    with torch.no_grad():
        prefix = run_prefix(full_model, batch)
        replayed_BLD = replay_last_layer(
            Qwen2VLTail.from_model(full_model),
            prefix.hidden_BLD,
            position_ids_3BL=prefix.position_ids_3BL,
            attention_mask_BL=prefix.attention_mask_BL,
        )
    reference = _full_run(full_model, batch)
    real = batch.attention_mask_BL.bool()
    assert torch.equal(prefix.hidden_BLD, reference.hidden_states[-2])
    diff = (replayed_BLD - reference.last_hidden_state)[real].abs().max().item()
    assert diff <= 1e-5
    assert reference.last_hidden_state[real].abs().max() > 0.1


def test_positions_are_multimodal_and_one_d_positions_differ(full_model):
    batch = _image_batch(padding_side="right")
    position_ids_3BL = multimodal_position_ids(full_model, batch)
    assert position_ids_3BL.shape == (3, 2, batch.input_ids_BL.shape[1])
    image_rows = position_ids_3BL[:, 1][:, batch.mm_token_type_ids_BL[1].bool()]
    # Second image: 2 x 3 merged grid after 3 text tokens + vision_start -> start position 4.
    assert image_rows[1].tolist() == [4, 4, 4, 5, 5, 5]
    assert image_rows[2].tolist() == [4, 5, 6, 4, 5, 6]
    with torch.no_grad():
        prefix = run_prefix(full_model, batch)
        tail = Qwen2VLTail.from_model(full_model)
        flat_3BL = torch.arange(batch.input_ids_BL.shape[1]).expand(3, 2, -1)
        wrong_BLD = tail(prefix.hidden_BLD, flat_3BL, prefix.attention_mask_BL)
    reference = _full_run(full_model, batch).last_hidden_state
    real = batch.attention_mask_BL.bool()
    assert (wrong_BLD - reference)[real].abs().max() > 1e-3


def test_truncated_prefix_matches_full_model_prefix(full_model):
    torch.manual_seed(0)
    truncated = Qwen2VLForConditionalGeneration(presets.tiny_qwen2vl_config()).model.eval()
    drop_last_layer(truncated)
    assert is_prefix_only(truncated) and not is_prefix_only(full_model)
    assert len(truncated.language_model.layers) == presets.TINY_QWEN2VL_NUM_LAYERS - 1
    batch = _image_batch(padding_side="right")
    with torch.no_grad():
        cut = run_prefix(truncated, batch)
        full = run_prefix(full_model, batch)
    assert torch.equal(cut.hidden_BLD, full.hidden_BLD)
    assert torch.equal(cut.position_ids_3BL, full.position_ids_3BL)
    with pytest.raises(ValueError, match="already truncated"):
        drop_last_layer(truncated)


def test_tail_module_holds_only_last_layer_and_norm(full_model):
    tail = Qwen2VLTail.from_model(full_model)
    names = {name.split(".")[0] for name, _ in tail.named_parameters()}
    assert names == {"layer", "norm"}
    assert tail.layer is full_model.language_model.layers[-1]
