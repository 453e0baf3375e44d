"""Sample encoder: stored outputs replay exactly, latents match the VAE, clear checkpoint errors."""

import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from components.checkpoints import CheckpointNotFoundError, resolve_checkpoint
from components.data.encode import EncodeConfig, SampleEncoder, decode_hidden, encode_hidden
from model.qwen2vl_tail import Qwen2VLTail, pad_prompt_batch

pytestmark = pytest.mark.unit

# Square, 2:1 and 1:2 bucketed images -> different image token counts in one padded batch.
IMAGE_SIZES = ((64, 64), (64, 32), (32, 64))
CAPTIONS = ("a red cat on a chair", "mountain lake at dawn with soft light", "dog")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for width, height in IMAGE_SIZES
    ]


def _config(paths, **overrides) -> EncodeConfig:
    values = {
        "qwen2vl": str(paths.qwen2vl),
        "flux": str(paths.flux),
        "image_tokens": 16,
        "batch_size": 3,
        "hidden_dtype": "float32",
        "device": "cpu",
    }
    return EncodeConfig(**(values | overrides))


@pytest.fixture(scope="module")
def encoders(tiny_models_dir) -> dict[str, SampleEncoder]:
    return {
        dtype: SampleEncoder(_config(tiny_models_dir, hidden_dtype=dtype))
        for dtype in ("float32", "bfloat16", "float8_e4m3fn")
    }


@pytest.fixture(scope="module")
def full_model(tiny_models_dir) -> torch.nn.Module:
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_models_dir.qwen2vl).model.eval()


def _replay_stored(samples, prompt: str, tail: Qwen2VLTail) -> torch.Tensor:
    """Re-batch stored per-sample tensors (right padding) and replay the last layer."""
    hidden_BLD, positions_3BL, mask_BL = pad_prompt_batch(
        [decode_hidden(s[f"{prompt}_hidden"], s.get(f"{prompt}_hidden_scale")) for s in samples],
        [s[f"{prompt}_position_ids"] for s in samples],
        [s[f"{prompt}_attention_mask"] for s in samples],
    )
    with torch.no_grad():
        return tail(hidden_BLD, positions_3BL, mask_BL)


def _full_final_hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(
            **batch.model_inputs(),
            output_hidden_states=True,
        ).hidden_states[-1]


def _replay_error(encoder, full_model, images, prompt: str) -> float:
    samples = encoder.encode(images, list(CAPTIONS))
    replayed = _replay_stored(samples, prompt, Qwen2VLTail.from_model(full_model))
    if prompt == "image_prompt":
        batch = encoder.image_prompt_batch(images)
    else:
        batch = encoder.caption_prompt_batch(list(CAPTIONS))
    reference = _full_final_hidden(full_model, batch)
    real = batch.attention_mask_BL.bool()
    assert replayed.shape == reference.shape
    return (replayed - reference)[real].abs().max().item()


def test_sample_keys_dtypes_and_shapes(encoders, images):
    samples = encoders["float8_e4m3fn"].encode(images, list(CAPTIONS))
    token_counts = {sample["image_prompt_hidden"].shape[0] for sample in samples}
    assert len(token_counts) > 1
    for sample, (width, height) in zip(samples, IMAGE_SIZES, strict=True):
        length = sample["image_prompt_hidden"].shape[0]
        assert sample["vae_latent"].shape == (16, height // 8, width // 8)
        assert sample["image_prompt_hidden"].dtype == torch.float8_e4m3fn
        assert sample["image_prompt_hidden_scale"].shape == (length,)
        assert sample["image_prompt_position_ids"].shape == (3, length)
        assert sample["image_prompt_position_ids"].dtype == torch.int32
        assert sample["image_prompt_attention_mask"].dtype == torch.int8
        grid = sample["image_grid_thw"]
        assert grid.dtype == torch.int32
        assert int(sample["image_prompt_image_mask"].sum()) == int(grid.prod()) // 4
        assert (
            sample["caption_prompt_position_ids"].shape[1]
            == sample["caption_prompt_hidden"].shape[0]
        )
        assert sample["clip_pooled"].shape == (32,) and sample["clip_pooled"].dtype == torch.float32


@pytest.mark.parametrize("prompt", ["image_prompt", "caption_prompt"])
def test_stored_prefix_replays_to_full_model_exactly(encoders, full_model, images, prompt):
    error = _replay_error(encoders["float32"], full_model, images, prompt)
    print(f"float32 {prompt} replay max abs error: {error:.3g}")
    assert error <= 1e-5


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 0.05), ("float8_e4m3fn", 0.25)])
def test_low_precision_replay_error_is_bounded(encoders, full_model, images, dtype, bound):
    error = _replay_error(encoders[dtype], full_model, images, "image_prompt")
    print(f"{dtype} image_prompt replay max abs error: {error:.4f}")
    assert 0.0 < error < bound


def test_batch_composition_does_not_change_prefix(tiny_models_dir, encoders, images):
    batched = encoders["float32"].encode(images, list(CAPTIONS))
    single = SampleEncoder(_config(tiny_models_dir, batch_size=1)).encode(images, list(CAPTIONS))
    for one, many in zip(single, batched, strict=True):
        for key in ("image_prompt_hidden", "caption_prompt_hidden"):
            torch.testing.assert_close(one[key], many[key], rtol=0, atol=1e-5)
        assert torch.equal(one["image_prompt_position_ids"], many["image_prompt_position_ids"])


def test_mean_latent_matches_direct_vae_encoding(encoders, images):
    encoder = encoders["float32"]
    samples = encoder.encode(images, list(CAPTIONS))
    for sample, image in zip(samples, images, strict=True):
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        pixels = (pixels / 127.5 - 1.0).unsqueeze(0)
        with torch.no_grad():
            direct = encoder.vae.encode(pixels).latent_dist.mean[0]
            # Each image here is alone in its size group, so the batch composition is the same:
            # equality is exact.
            assert torch.equal(sample["vae_latent"], direct)
            decoded = encoder.vae.decode(sample["vae_latent"].unsqueeze(0)).sample
            assert torch.equal(decoded, encoder.vae.decode(direct.unsqueeze(0)).sample)
            assert decoded.shape == pixels.shape


def test_sample_mode_draws_around_the_mean(tiny_models_dir, encoders, images):
    sampled = SampleEncoder(_config(tiny_models_dir, latent_mode="sample")).encode_latents(images)
    mean = encoders["float32"].encode_latents(images)
    assert not torch.equal(sampled[0], mean[0])
    assert sampled[0].shape == mean[0].shape


def test_fp8_round_trip_is_close_per_token():
    hidden = torch.randn(7, 16) * torch.logspace(-3, 2, 7).unsqueeze(-1)
    stored = encode_hidden(hidden, "float8_e4m3fn")
    restored = decode_hidden(stored["hidden"], stored["scale"])
    relative = (restored - hidden).abs().amax(dim=-1) / hidden.abs().amax(dim=-1)
    assert relative.max() <= 1 / 16
    assert torch.equal(decode_hidden(encode_hidden(hidden, "float32")["hidden"]), hidden)


def test_describe_names_the_cut_and_the_latent_convention(encoders):
    description = encoders["bfloat16"].describe()
    assert description["layer_cut"] == "input of decoder layer 1 of 2"
    assert description["qwen2vl_revision"].startswith("local:")
    vae = encoders["bfloat16"].vae.config
    factors = (description["vae_scaling_factor"], description["vae_shift_factor"])
    assert factors == (vae.scaling_factor, vae.shift_factor)
    assert description["latent_is_raw"] and description["hidden_dtype"] == "bfloat16"


def test_missing_and_partial_checkpoints_name_the_path(tiny_models_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        SampleEncoder(_config(tiny_models_dir, qwen2vl=str(missing)))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_models_dir.qwen2vl, partial)
    (partial / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00005"):
        SampleEncoder(_config(tiny_models_dir, qwen2vl=str(partial)))
    with pytest.raises(CheckpointNotFoundError, match="no-such-org/no-such-model"):
        SampleEncoder(_config(tiny_models_dir, flux="no-such-org/no-such-model"))


def test_hub_id_resolves_through_local_cache_with_commit(tiny_models_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-qwen"
    shutil.copytree(tiny_models_dir.qwen2vl, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    resolved = resolve_checkpoint(
        "tiny-org/tiny-qwen", revision=None, root_file="config.json", required=("model",)
    )
    assert resolved.revision_id == commit
    assert resolved.path == repo / "snapshots" / commit


def test_config_and_inputs_are_validated(tiny_models_dir, encoders, images):
    with pytest.raises(ValueError, match="hidden_dtype"):
        _config(tiny_models_dir, hidden_dtype="float16")
    with pytest.raises(ValueError, match="latent_mode"):
        _config(tiny_models_dir, latent_mode="mode")
    with pytest.raises(ValueError, match="multiples of 16"):
        encoders["float32"].encode([images[0].resize((40, 64))], ["x"])
    with pytest.raises(ValueError, match="captions"):
        encoders["float32"].encode(images, ["only one"])
