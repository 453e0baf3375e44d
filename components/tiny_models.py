"""Tiny random checkpoints on disk, in the layouts of the real ones.

Input: an output folder and a seed. Output (deterministic from the seed, byte-identical rebuilds):
  <out>/qwen2-vl/  layout of Qwen/Qwen2-VL-7B-Instruct: config.json, sharded model-*.safetensors
                   + model.safetensors.index.json (legacy names model.layers.N.*, visual.*,
                   lm_head.weight), tokenizer.json/tokenizer_config.json with the Qwen2-VL special
                   tokens and chat template, chat_template.json, preprocessor_config.json.
  <out>/flux/      diffusers layout of black-forest-labs/FLUX.1-dev: model_index.json,
                   transformer/ (sharded), vae/, text_encoder/ + tokenizer/ (CLIP),
                   text_encoder_2/ (T5 encoder, sharded) + tokenizer_2/ (T5), scheduler/.
  <out>/controlnet/ diffusers FluxControlNetModel layout (config.json +
                   diffusion_pytorch_model.safetensors): a union ControlNet at the tiny FLUX dims.
  <out>/depth-anything/ transformers layout of depth-anything/Depth-Anything-V2-*-hf
                   (DepthAnythingForDepthEstimation + DPTImageProcessor preprocessor_config.json).
  <out>/photos/    a local folder source like a fine-tuner's own (demo_corpus.write_folder_corpus):
                   synthetic images in subfolders, captions in .txt / .json sidecars and
                   metadata.jsonl, some uncaptioned; the tiny preset mixes it with its url list.
  <out>/tiny_models.json  marker written last; a build with the same seed is skipped.
Everything loads back through the usual from_pretrained calls.
"""

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    DepthAnythingForDepthEstimation,
    Qwen2Tokenizer,
    Qwen2VLForConditionalGeneration,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from components.data.demo_corpus import COLOURS, POSITIONS, SHAPES, write_folder_corpus
from model import presets

MARKER_NAME = "tiny_models.json"
BUILD_FORMAT = 7
"""6: the photos folder. 7: FLUX's T5 text encoder (text_encoder_2/, tokenizer_2/)."""
PHOTOS_COUNT = 24
QWEN2VL_SHARD_SIZE = "40KB"
FLUX_SHARD_SIZE = "2MB"
T5_SHARD_SIZE = "40KB"

# Written for this project; mirrors what the released Qwen2-VL template renders: a default system
# turn, images as <|vision_start|><|image_pad|><|vision_end|>, and the assistant generation prompt.
QWEN2VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_GENERAL_TEXT = (
    "You are a helpful assistant.",
    "Describe this image.",
    "system user assistant",
    "a photo of a red cat sitting on a blue chair in the sun",
    "a painting of a mountain lake at dawn, soft light, high detail",
    "an old city street with shops, people and bicycles",
    "close up portrait of a dog with green eyes",
    "the quick brown fox jumps over the lazy dog 0123456789",
)


def _tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: general lines plus every word the demo corpus
    captions use, so "yellow" or "background" is one token as in the real vocabularies (with
    the general lines alone, 6 of the 9 colour words fell apart into letters)."""
    lines = list(_GENERAL_TEXT)
    for colour in sorted(COLOURS):
        for shape in SHAPES:
            for position in sorted(POSITIONS):
                lines.append(f"a {colour} {shape} in the {position} on an {colour} background")
    return lines


@dataclass(frozen=True, slots=True)
class TinyModelPaths:
    """Where build_tiny_models put the checkpoints."""

    root: Path
    qwen2vl: Path
    flux: Path
    controlnet: Path | None = None
    """Tiny union FLUX ControlNet (None for bases assembled without one)."""
    depth: Path | None = None
    """Tiny Depth Anything depth estimator."""
    photos: Path | None = None
    """The folder source of the tiny preset (images + captions)."""


def build_tiny_models(out_dir: Path, *, seed: int = 0) -> TinyModelPaths:
    """Write tiny Qwen2-VL, FLUX, ControlNet and depth checkpoints and the photos folder under
    out_dir (skipped if already built)."""
    out_dir = Path(out_dir)
    paths = TinyModelPaths(
        root=out_dir,
        qwen2vl=out_dir / "qwen2-vl",
        flux=out_dir / "flux",
        controlnet=out_dir / "controlnet",
        depth=out_dir / "depth-anything",
        photos=out_dir / "photos",
    )
    marker = _marker_content(seed)
    marker_path = out_dir / MARKER_NAME
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)
    staging = out_dir / f".build-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _write_qwen2vl(staging / "qwen2-vl", seed=seed)
    _write_flux(staging / "flux", seed=seed)
    _write_controlnet(staging / paths.controlnet.name, seed=seed)
    _write_depth(staging / paths.depth.name, seed=seed)
    write_folder_corpus(staging / paths.photos.name, count=PHOTOS_COUNT, seed=seed, max_side_px=160)
    for final in (paths.qwen2vl, paths.flux, paths.controlnet, paths.depth, paths.photos):
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging / final.name, final)
    staging.rmdir()
    _write_json_atomic(marker_path, marker)
    return paths


def _marker_content(seed: int) -> dict:
    # The presets' hash: a changed tiny architecture must rebuild, not reuse an old build.
    architecture = json.dumps(
        [
            presets.tiny_qwen2vl_config().to_dict(),
            presets.tiny_flux_transformer_kwargs(),
            presets.tiny_vae_kwargs(),
            presets.tiny_clip_text_config().to_dict(),
            presets.tiny_t5_config(len(_t5_vocab())).to_dict(),
            presets.tiny_controlnet_kwargs(),
            presets.tiny_depth_config().to_dict(),
            presets.depth_processor_kwargs(presets.TINY_DEPTH_PROCESSOR_SIDE),
        ],
        sort_keys=True,
        default=str,
    )
    return {
        "format": BUILD_FORMAT,
        "seed": seed,
        "presets_sha256": hashlib.sha256(architecture.encode()).hexdigest(),
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }


def _write_json_atomic(path: Path, content: dict) -> None:
    tmp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp_path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_path, path)


def _write_qwen2vl(out: Path, *, seed: int) -> None:
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(presets.tiny_qwen2vl_config())
    model.save_pretrained(out, max_shard_size=QWEN2VL_SHARD_SIZE)
    tokenizer = _build_qwen2vl_tokenizer()
    tokenizer.save_pretrained(out)
    _write_json_atomic(out / "chat_template.json", {"chat_template": QWEN2VL_CHAT_TEMPLATE})
    Qwen2VLImageProcessorPil().save_pretrained(out)


def _build_qwen2vl_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE learnt in-process; special tokens hold ids 0.. (see presets)."""
    vocab = {token: index for index, token in enumerate(presets.QWEN2VL_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(
        tuple(word) for line in _tokenizer_corpus() for word, _ in splitter.pre_tokenize_str(line)
    )
    merges = _learn_merges(words, vocab, size=presets.TINY_QWEN2VL_VOCAB_SIZE - 64)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(presets.QWEN2VL_SPECIAL_TOKENS)}
    )
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def _write_flux(out: Path, *, seed: int) -> None:
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(**presets.tiny_flux_transformer_kwargs())
    transformer.save_pretrained(out / "transformer", max_shard_size=FLUX_SHARD_SIZE)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**presets.tiny_vae_kwargs())
    shift_factor, scaling_factor = _latent_statistics(vae, seed=seed)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    vae.save_pretrained(out / "vae")
    torch.manual_seed(seed + 3)
    CLIPTextModel(presets.tiny_clip_text_config()).save_pretrained(out / "text_encoder")
    _build_clip_tokenizer().save_pretrained(out / "tokenizer")
    torch.manual_seed(seed + 6)
    vocab = _t5_vocab()
    T5EncoderModel(presets.tiny_t5_config(len(vocab))).save_pretrained(
        out / "text_encoder_2", max_shard_size=T5_SHARD_SIZE
    )
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(out / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**presets.flux_scheduler_kwargs()).save_pretrained(
        out / "scheduler"
    )
    _write_json_atomic(out / "model_index.json", _flux_model_index())


def _latent_statistics(vae: AutoencoderKL, *, seed: int) -> tuple[float, float]:
    """(shift_factor, scaling_factor) that make this VAE's latents zero-mean and unit-variance,
    as FLUX.1-dev's 0.1159 / 0.3611 do for its VAE. FLUX's own numbers on a random VAE left the
    latents at std 0.14, where an image's colour moved them by ~0.01: far below the noise the
    flow model regresses, so no tiny run could learn what a caption or reference asks for."""
    with torch.no_grad():
        latents = vae.encode(_calibration_images(seed=seed)).latent_dist.mean
    # Rounded like FLUX's factors, so rebuilds on other thread counts write the same config.
    return round(float(latents.mean()), 4), round(1.0 / float(latents.std()), 4)


def _calibration_images(*, seed: int, count: int = 32, side: int = 64) -> torch.Tensor:
    """Flat colours with a gentle gradient and a disc or box of another colour, in [-1, 1]:
    [count, 3, side, side], deterministic from the seed."""
    generator = torch.Generator().manual_seed(seed + 17)
    draw = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    background, shape_colour = draw(count, 3, 1, 1) * 2 - 1, draw(count, 3, 1, 1) * 2 - 1
    slope = (draw(count, 2, 1, 1) - 0.5) * 0.6
    images = background + (slope[:, :1] * xs + slope[:, 1:] * ys)[:, None, 0]
    centre_x, centre_y = (draw(count, 2, 1, 1) * 1.2 - 0.6).unbind(1)
    radius = draw(count, 1, 1) * 0.4 + 0.15
    disc = (xs - centre_x) ** 2 + (ys - centre_y) ** 2 < radius**2
    box = ((xs - centre_x).abs() < radius) & ((ys - centre_y).abs() < radius)
    shape_mask = torch.where(draw(count, 1, 1) < 0.5, disc, box)[:, None]
    return torch.where(shape_mask, shape_colour.expand_as(images), images).clamp(-1, 1)


def _write_controlnet(out: Path, *, seed: int) -> None:
    torch.manual_seed(seed + 4)
    controlnet = FluxControlNetModel(**presets.tiny_controlnet_kwargs())
    # diffusers zero-initialises the residual projections (a ControlNet starts as a no-op); a
    # trained one is not zero, so the tiny one gets small random values there: otherwise every
    # control would add exactly nothing and no test could see it work.
    zero_started = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]
    zero_started.append(controlnet.controlnet_x_embedder)
    with torch.no_grad():
        for layer in zero_started:
            layer.weight.normal_(0.0, 0.2)
            layer.bias.normal_(0.0, 0.02)
    controlnet.save_pretrained(out)


def _write_depth(out: Path, *, seed: int) -> None:
    torch.manual_seed(seed + 5)
    DepthAnythingForDepthEstimation(presets.tiny_depth_config()).save_pretrained(out)
    processor_kwargs = presets.depth_processor_kwargs(presets.TINY_DEPTH_PROCESSOR_SIDE)
    DPTImageProcessorPil(**processor_kwargs).save_pretrained(out)


def _build_clip_tokenizer() -> CLIPTokenizer:
    """CLIP-style BPE learnt in-process: every byte symbol, plain and word-final (</w>), then
    the learned merges, as CLIP-L's vocab.json and merges.txt are laid out."""
    vocab = {token: index for index, token in enumerate(presets.CLIP_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    words = Counter(
        (*word[:-1], word[-1] + "</w>")
        for line in _tokenizer_corpus()
        for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(line.lower())
    )
    merges = _learn_merges(words, vocab, size=presets.TINY_CLIP_VOCAB_SIZE)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's layout (<pad> 0, </s> 1, <unk> 2, then "▁"-prefixed
    words and single characters): every word of the tokenizer corpus, scored by how often it
    occurs (ties by text, so every build is the same), then each character as a fallback."""
    words = Counter(word for line in _tokenizer_corpus() for word in line.lower().split())
    ranked = sorted(words, key=lambda word: (-words[word], word))
    vocab = [(token, 0.0) for token in presets.T5_SPECIAL_TOKENS]
    vocab += [(f"▁{word}", -1.0 - rank / len(ranked)) for rank, word in enumerate(ranked)]
    characters = sorted({char for line in _tokenizer_corpus() for char in line.lower()} - {" "})
    vocab += [("▁", -5.0)] + [(char, -10.0) for char in characters]
    return vocab


def _learn_merges(
    words: Counter[tuple[str, ...]], vocab: dict[str, int], *, size: int
) -> list[tuple[str, str]]:
    """BPE merges learnt greedily from word counts (symbol tuples), the most frequent adjacent
    pair first and ties broken by the pair's text, so every build learns the same merges (the
    tokenizers library's trainer breaks ties in hash order: its vocab changed between builds).
    Each merged token is added to `vocab` until it holds `size` entries."""
    merges = []
    while len(vocab) < size:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def _flux_model_index() -> dict:
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
