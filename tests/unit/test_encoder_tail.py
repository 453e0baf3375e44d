"""Encoder tail from a checkpoint: bit-exact vs the full model, reads only the shards it needs."""

import json
import shutil
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration

from components.checkpoints import CheckpointNotFoundError
from components.training import encoder_tail
from components.training.encoder_tail import TailCheckpointError, load_qwen2vl_tail
from model.qwen2vl_tail import Qwen2VLTail

pytestmark = pytest.mark.unit

INDEX = "model.safetensors.index.json"


def _last_layer_index(checkpoint: Path) -> int:
    return (
        json.loads((checkpoint / "config.json").read_text())["text_config"]["num_hidden_layers"] - 1
    )


def _tail_tensor_names(checkpoint: Path) -> list[str]:
    prefix = f"model.layers.{_last_layer_index(checkpoint)}."
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    return [name for name in weight_map if name.startswith(prefix) or name == "model.norm.weight"]


def _needed_shards(checkpoint: Path) -> set[str]:
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    return {weight_map[name] for name in _tail_tensor_names(checkpoint)}


def _reference_tail(checkpoint: Path, dtype: torch.dtype) -> Qwen2VLTail:
    full = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    return Qwen2VLTail.from_model(full.model)


def _assert_same_tail(loaded: Qwen2VLTail, reference: Qwen2VLTail) -> None:
    loaded_state, reference_state = loaded.state_dict(), reference.state_dict()
    assert loaded_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    for (name, buffer), (_, loaded_buffer) in zip(
        reference.named_buffers(), loaded.named_buffers(), strict=True
    ):
        assert torch.equal(loaded_buffer, buffer), name


def _replay_inputs(hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden_BLD = torch.randn(2, 9, hidden_size, generator=generator)
    position_ids_3BL = torch.arange(9).expand(3, 2, 9).clone()
    position_ids_3BL[1:, 0, 2:6] = torch.tensor([[2, 2, 3, 3], [2, 3, 2, 3]])
    attention_mask_BL = torch.ones(2, 9, dtype=torch.long)
    attention_mask_BL[1, 6:] = 0
    return hidden_BLD, position_ids_3BL, attention_mask_BL


@pytest.fixture
def checkpoint_copy(tiny_models_dir, tmp_path) -> Path:
    copy = tmp_path / "qwen2-vl"
    shutil.copytree(tiny_models_dir.qwen2vl, copy)
    return copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_equals_from_model_bit_for_bit(tiny_models_dir, dtype):
    loaded = load_qwen2vl_tail(str(tiny_models_dir.qwen2vl), dtype=dtype)
    reference = _reference_tail(tiny_models_dir.qwen2vl, dtype)
    _assert_same_tail(loaded, reference)
    assert loaded.layer.self_attn.config._attn_implementation == "sdpa"
    assert all(parameter.requires_grad for parameter in loaded.parameters())
    inputs = _replay_inputs(loaded.norm.weight.shape[0])
    with torch.no_grad():
        hidden = (inputs[0].to(dtype), *inputs[1:])
        assert torch.equal(loaded(*hidden), reference.eval()(*hidden))


def test_loads_with_only_the_shards_holding_the_tail(checkpoint_copy):
    needed = _needed_shards(checkpoint_copy)
    removed = [
        path for path in checkpoint_copy.glob("model-*.safetensors") if path.name not in needed
    ]
    assert removed, "tiny checkpoint must spread over more shards than the tail needs"
    reference = _reference_tail(checkpoint_copy, torch.float32)
    for path in removed:
        path.unlink()
    _assert_same_tail(load_qwen2vl_tail(str(checkpoint_copy)), reference)


def test_opens_each_needed_shard_once_and_no_other(tiny_models_dir, monkeypatch):
    opened = []

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return safetensors.safe_open(path, *args, **kwargs)

    monkeypatch.setattr(encoder_tail, "safe_open", spy)
    load_qwen2vl_tail(str(tiny_models_dir.qwen2vl))
    assert sorted(opened) == sorted(_needed_shards(tiny_models_dir.qwen2vl))


def test_single_file_and_nested_layouts_load_the_same_tail(tiny_models_dir, tmp_path):
    reference = _reference_tail(tiny_models_dir.qwen2vl, torch.float32)
    tensors = {}
    for shard in sorted(tiny_models_dir.qwen2vl.glob("model-*.safetensors")):
        tensors |= load_file(shard)
    nested = {
        name.replace("model.", "model.language_model.", 1)
        if name.startswith(("model.layers.", "model.norm."))
        else name: tensor
        for name, tensor in tensors.items()
    }
    for layout, state in (("single", tensors), ("nested", nested)):
        root = tmp_path / layout
        root.mkdir()
        shutil.copy(tiny_models_dir.qwen2vl / "config.json", root / "config.json")
        save_file(state, root / "model.safetensors", metadata={"format": "pt"})
        _assert_same_tail(load_qwen2vl_tail(str(root)), reference)


def test_missing_tensor_in_index_is_named(checkpoint_copy):
    missing = f"model.layers.{_last_layer_index(checkpoint_copy)}.mlp.down_proj.weight"
    index = json.loads((checkpoint_copy / INDEX).read_text())
    del index["weight_map"][missing]
    (checkpoint_copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(TailCheckpointError, match=missing.replace(".", r"\.")):
        load_qwen2vl_tail(str(checkpoint_copy))


def test_tensor_absent_from_its_shard_is_named(checkpoint_copy):
    missing = "model.norm.weight"
    shard = (
        checkpoint_copy / json.loads((checkpoint_copy / INDEX).read_text())["weight_map"][missing]
    )
    tensors = load_file(shard)
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(TailCheckpointError, match=rf"{shard.name}.*model\.norm\.weight"):
        load_qwen2vl_tail(str(checkpoint_copy))


def test_unexpected_tail_tensor_is_named(checkpoint_copy):
    extra = f"model.layers.{_last_layer_index(checkpoint_copy)}.self_attn.extra.weight"
    index = json.loads((checkpoint_copy / INDEX).read_text())
    index["weight_map"][extra] = "model-00001-of-00005.safetensors"
    (checkpoint_copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(TailCheckpointError, match=r"unexpected \[.*self_attn\.extra\.weight"):
        load_qwen2vl_tail(str(checkpoint_copy))


def test_missing_needed_shard_file_is_named(checkpoint_copy):
    shard = sorted(_needed_shards(checkpoint_copy))[0]
    (checkpoint_copy / shard).unlink()
    with pytest.raises(CheckpointNotFoundError, match=shard):
        load_qwen2vl_tail(str(checkpoint_copy))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        load_qwen2vl_tail(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointNotFoundError, match="not-cached/qwen2-vl"):
        load_qwen2vl_tail("not-cached/qwen2-vl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_qwen2vl_tail(str(tmp_path / "empty"))


def test_weights_missing_is_named(checkpoint_copy):
    (checkpoint_copy / INDEX).unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"model\.safetensors"):
        load_qwen2vl_tail(str(checkpoint_copy))
