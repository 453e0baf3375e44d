"""A tiny release in the exact layout of the published Qwen2vl-Flux checkpoint, built from the
session's tiny models (random weights, bf16 as published):

  flux/                     the tiny FLUX folder (CLIP and T5 included); transformer/ re-saved in
                            bf16, sharded, its double block 1 nudged so it differs from the base
  qwen2-vl/                 the tiny Qwen2-VL's tensors without lm_head, in bf16, in 3 shards
                            with an index, legacy names (`visual.*`, `model.*`), its config
                            naming the authors' class, tokenizer, chat template, processor
  qwen2-vl/connector.pt     {"module.linear.weight", "module.linear.bias"} (a DataParallel save)
  qwen2-vl/t5_embedder.pt   {"weight", "bias"}
  controlnet/               the tiny union ControlNet

    build_tiny_release(out, models, pickles_at_top=False) -> out
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from components.inference import release
from components.inference.package import qwen2vl_weight_files
from components.tiny_models import TinyModelPaths

NUM_QWEN2VL_SHARDS = 3


def build_tiny_release(
    out: Path, models: TinyModelPaths, *, seed: int = 0, pickles_at_top: bool = False
) -> Path:
    out = Path(out)
    flux = out / release.FLUX_DIR
    shutil.copytree(models.flux, flux, ignore=shutil.ignore_patterns("transformer"))
    transformer = FluxTransformer2DModel.from_pretrained(
        models.flux, subfolder="transformer", torch_dtype=torch.bfloat16
    )
    generator = torch.Generator().manual_seed(seed + 30)
    with torch.no_grad():
        for param in transformer.transformer_blocks[1].parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    transformer.save_pretrained(flux / "transformer", max_shard_size="2MB")
    qwen = out / release.QWEN2VL_DIR
    _write_qwen2vl_without_lm_head(models.qwen2vl, qwen)
    config = json.loads((qwen / "config.json").read_text())
    hidden = int(config["text_config"]["hidden_size"])
    t5_width = json.loads((flux / "text_encoder_2" / "config.json").read_text())["d_model"]
    flux_config = transformer.config
    inner = flux_config.num_attention_heads * flux_config.attention_head_dim
    joint = flux_config.joint_attention_dim
    pickles = out if pickles_at_top else qwen
    connector = _random_linear(hidden, joint, generator)
    torch.save(
        {f"module.linear.{key}": value for key, value in connector.items()},
        pickles / release.CONNECTOR_PICKLE,
    )
    torch.save(_random_linear(t5_width, inner, generator), pickles / release.T5_EMBEDDER_PICKLE)
    shutil.copytree(models.controlnet, out / release.CONTROLNET_DIR)
    return out


def _random_linear(in_features: int, out_features: int, generator) -> dict[str, torch.Tensor]:
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator) * 0.02
    return {"weight": weight.to(torch.bfloat16), "bias": bias.to(torch.bfloat16)}


def _write_qwen2vl_without_lm_head(source: Path, out: Path) -> None:
    """The tiny checkpoint's tensors minus lm_head, bf16, re-sharded; its other files copied."""
    weights = [path.name for path in qwen2vl_weight_files(source)]
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(*weights))
    tensors: dict[str, torch.Tensor] = {}
    for name in weights:
        if name.endswith(".safetensors"):
            tensors |= load_file(str(source / name))
    kept = sorted(key for key in tensors if not key.startswith("lm_head."))
    weight_map = {}
    for number in range(NUM_QWEN2VL_SHARDS):
        shard = f"model-{number + 1:05d}-of-{NUM_QWEN2VL_SHARDS:05d}.safetensors"
        part = kept[number::NUM_QWEN2VL_SHARDS]
        save_file(
            {key: tensors[key].to(torch.bfloat16).contiguous() for key in part},
            str(out / shard),
            {"format": "pt"},
        )
        weight_map |= dict.fromkeys(part, shard)
    total = sum(tensors[key].numel() * 2 for key in kept)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["Qwen2VLSimplifiedModel"]
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
