"""The bars of the cache: shard rows (after the Parquet round trip) replay Qwen2-VL's last layer
exactly and hold the VAE latents of the bucketed image, for samples of different buckets; the
fitted image the encoder read is exactly the source bytes (downloaded, or read from the tiny
preset's folder source) decoded and fitted again here."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import Qwen2VLForConditionalGeneration

from components.data import shard_format
from components.data.buckets import build_buckets, fit_to_bucket
from components.data.download import DOWNLOAD_FILE_NAME
from components.data.encode import SampleEncoder, decode_hidden
from components.data.filters import normalise_image
from model.qwen2vl_tail import Qwen2VLTail, pad_prompt_batch
from pipelines.data_layout import DataLayout, read_fitted_slices

pytestmark = pytest.mark.integration


def _original_bytes(layout: DataLayout, chunk: int, config=None) -> dict[str, bytes]:
    """The source bytes of a chunk, by sample key: as img2dataset wrote them for a url-list
    chunk, read here from the folder for a chunk of a folder source."""
    downloaded = layout.chunk_dir(chunk) / DOWNLOAD_FILE_NAME
    if downloaded.exists():
        table = pq.read_table(downloaded, columns=["key", "image"])
        return {row["key"]: row["image"] for row in table.to_pylist() if row["image"] is not None}
    originals = {}
    for row in pq.read_table(layout.chunk_outcome(chunk)).to_pylist():
        source, relpath = row["url"].split(":", 1)
        folder = Path(config.data.source(source).paths[0])
        if row["reason"] == "kept":
            originals[row["sample_key"]] = (folder / relpath).read_bytes()
    return originals


@pytest.fixture(scope="module")
def stored(tiny_data_run):
    """Two samples of the 1:2 bucket and two of the widest bucket, with their bucketed images
    (decoded and fitted here from the downloaded bytes, independently of the pipeline)."""
    config, _ = tiny_data_run
    layout = DataLayout(Path(config.run.root))
    buckets = {bucket.bucket_id: bucket for bucket in build_buckets(config.data.buckets)}
    picked = []
    for bucket_id in ("64x128", "128x48"):
        path = shard_format.list_shards(layout.data)
        path = next(p for p in path if p.parent.name == f"bucket={bucket_id}")
        samples = list(shard_format.iter_samples(shard_format.read_shard(path)))[:2]
        chunk = int(path.stem.removeprefix("part-"))
        originals = _original_bytes(layout, chunk, config)
        for sample in samples:
            image = normalise_image(originals[sample["sample_key"]], max_pixels=10**8)
            picked.append((sample, fit_to_bucket(image, buckets[bucket_id])))
    return config, picked


def test_encoder_input_is_the_image_decoded_and_fitted_once(tiny_data_run):
    """Every encoded sample's fitted image (written by the chunk task, read by the encoder) is
    pixel for pixel the downloaded bytes decoded and fitted to its bucket."""
    config, summary = tiny_data_run
    layout = DataLayout(Path(config.run.root))
    buckets = {bucket.bucket_id: bucket for bucket in build_buckets(config.data.buckets)}
    max_pixels = config.data.filters.max_pixels
    checked = 0
    for path in shard_format.list_shards(layout.data):
        bucket = buckets[path.parent.name.removeprefix("bucket=")]
        chunk = int(path.stem.removeprefix("part-"))
        keys = pq.read_table(path, columns=["sample_key"])["sample_key"].to_pylist()
        originals = _original_bytes(layout, chunk, config)
        fitted = layout.fitted_images(chunk, bucket.bucket_id)
        for slice_keys, images in read_fitted_slices(fitted, keys, bucket, slice_rows=64):
            for key, image in zip(slice_keys, images, strict=True):
                decoded = normalise_image(originals[key], max_pixels=max_pixels)
                assert image.tobytes() == fit_to_bucket(decoded, bucket).tobytes(), key
                checked += 1
    assert checked == summary.encoded > 0


def test_stored_prefix_replays_to_the_full_model(stored):
    config, picked = stored
    encoder = SampleEncoder(config.data.encode)
    full = Qwen2VLForConditionalGeneration.from_pretrained(config.data.encode.qwen2vl).model.eval()
    samples, images = zip(*picked, strict=True)
    hidden_BLD, positions_3BL, mask_BL = pad_prompt_batch(
        [decode_hidden(s["image_prompt_hidden"]) for s in samples],
        [s["image_prompt_position_ids"] for s in samples],
        [s["image_prompt_attention_mask"] for s in samples],
    )
    batch = encoder.image_prompt_batch(list(images))
    with torch.no_grad():
        replayed = Qwen2VLTail.from_model(full)(hidden_BLD, positions_3BL, mask_BL)
        reference = full(
            **batch.model_inputs(),
            output_hidden_states=True,
        ).hidden_states[-1]
    lengths = {int(s["image_prompt_attention_mask"].sum()) for s in samples}
    assert len(lengths) > 1, "the batch must mix token counts (different aspect ratios)"
    assert replayed.shape == reference.shape
    real = batch.attention_mask_BL.bool()
    assert torch.equal(real, mask_BL.bool())
    error = (replayed - reference)[real].abs().max().item()
    print(f"replay max abs error through shards (fp32): {error:.3g}")
    assert error <= 1e-5


def test_stored_latents_equal_direct_vae_encoding(stored):
    config, picked = stored
    vae = AutoencoderKL.from_pretrained(config.data.encode.flux, subfolder="vae").eval()
    for sample, image in picked:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        pixels = pixels.float().div(127.5).sub(1.0).unsqueeze(0)
        with torch.no_grad():
            direct = vae.encode(pixels).latent_dist.mean[0]
        stored_latent = sample["vae_latent"]
        assert stored_latent.dtype == direct.dtype == torch.float32
        # Batch composition differs from the encoder's batches: allow float32 reduction noise.
        torch.testing.assert_close(stored_latent, direct, rtol=0, atol=1e-5)
        with torch.no_grad():
            decoded_stored = vae.decode(stored_latent.unsqueeze(0)).sample
            decoded_direct = vae.decode(direct.unsqueeze(0)).sample
        # The decoder amplifies the 1e-5 latent noise about tenfold (measured 1.1e-5 max).
        torch.testing.assert_close(decoded_stored, decoded_direct, rtol=0, atol=1e-4)
