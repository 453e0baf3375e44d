"""`data.encode.t5_caption`: the data pipeline caches FLUX's T5 states of every caption (the
released model's T5 text branch), declared by the manifest, in shard format 4; the states are
what the T5 encoder the generator uses makes of the stored caption, and the loader batches them."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from components.data import shard_format
from components.data.t5_states import T5PromptEncoder
from components.training.loader import ShardReader, load_micro_batch
from components.training.step_plan import RowRef
from model.presets import T5_MAX_TOKENS
from pipelines.data import run_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def t5_dataset(tmp_path_factory, tiny_models_dir, ray_local) -> Path:
    config = tiny_config(
        tmp_path_factory.mktemp("t5_data"),
        tiny_models_dir,
        "data.synthetic.count=16",
        "data.resources.chunk_size=16",
        "data.encode.t5_caption=true",
    )
    run_data(config, show_progress=False)
    return Path(config.run.root) / "data"


def test_the_manifest_declares_the_t5_states(t5_dataset, tiny_models_dir):
    manifest = shard_format.read_manifest(t5_dataset)
    assert manifest["format_version"] == 4 and shard_format.has_t5_caption(manifest)
    declared = manifest["encoders"]["t5_caption"]
    encoder = T5PromptEncoder(tiny_models_dir.flux, device=torch.device("cpu"), dtype=torch.float32)
    assert declared["max_tokens"] == T5_MAX_TOKENS and declared["d_model"] == encoder.d_model
    assert declared["encoder"].endswith("/text_encoder_2")
    assert manifest["tensor_dtypes"]["caption_t5_hidden"] == manifest["encoders"]["hidden_dtype"]
    assert manifest["bytes_per_sample"]["columns_uncompressed"]["caption_t5_hidden"] > 0


def test_every_row_holds_the_t5_states_of_its_caption(t5_dataset, tiny_models_dir):
    encoder = T5PromptEncoder(tiny_models_dir.flux, device=torch.device("cpu"), dtype=torch.float32)
    stored_dtype = shard_format.read_manifest(t5_dataset)["encoders"]["hidden_dtype"]
    rows = 0
    for path in shard_format.list_shards(t5_dataset):
        samples = list(shard_format.iter_samples(shard_format.read_shard(path)))
        expected = encoder.encode([sample["caption"] for sample in samples])
        for sample, states in zip(samples, expected, strict=True):
            stored = sample["caption_t5_hidden"]
            assert str(stored.dtype).removeprefix("torch.") == stored_dtype
            assert stored.shape == (T5_MAX_TOKENS, encoder.d_model)
            torch.testing.assert_close(stored.float(), states.to(stored.dtype).float())
            rows += 1
    assert rows == shard_format.read_manifest(t5_dataset)["counts"]["encoded"] > 0


def test_the_loader_batches_the_t5_states(t5_dataset):
    path = shard_format.list_shards(t5_dataset)[0]
    count = shard_format.read_shard(path).num_rows
    refs = [RowRef(str(path), row) for row in range(min(count, 3))]
    batch = load_micro_batch(refs, reader=ShardReader())
    assert batch["caption_t5_hidden"].dtype == torch.float32
    assert batch["caption_t5_hidden"].shape[:2] == (len(refs), T5_MAX_TOKENS)
