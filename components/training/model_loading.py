"""The trainable Qwen2VL-Flux modules from the configured checkpoints, and the dataset's latent
convention.

Model: the FLUX transformer from the diffusers-layout checkpoint, Qwen2-VL's last layer + norm
read alone from its sharded checkpoint (components/training/encoder_tail.py) and a fresh
connector drawn from `seed`. Convention: the VAE shift/scale the dataset's latents were encoded
under (its manifest) and the CLIP-L pooled vector of the empty prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.checkpoints import resolve_checkpoint
from components.data import shard_format
from components.data.encode import EncodeConfig, clip_pooled
from components.training.encoder_tail import load_qwen2vl_tail
from components.training.objective import LatentConvention, QwenFluxModel
from model.conditioning import TEXT_BRANCHES, Connector
from model.latent_codec import LatentCodec


def load_modules(
    encode: EncodeConfig,
    *,
    seed: int,
    init_from: Path | None = None,
    text_branch: str = "qwen2vl",
) -> QwenFluxModel:
    """The one assembly of the Qwen2VL-Flux modules from the configured bases: base FLUX
    transformer, Qwen2-VL's last layer + norm, a connector drawn from `seed` (on the CPU). With
    `init_from` (a model package folder), the package's transformer, tail and connector instead,
    in float32 (names and shapes checked strictly). With text_branch "t5", also the
    t5_embedder: the init package's when it has one, else a fresh Linear(T5 width -> FLUX's
    inner width) drawn after the connector."""
    if text_branch not in TEXT_BRANCHES:
        raise ValueError(f"text_branch must be one of {TEXT_BRANCHES}, got {text_branch!r}")
    from diffusers import FluxTransformer2DModel

    if init_from is not None:
        transformer = FluxTransformer2DModel.from_pretrained(
            Path(init_from) / "transformer", torch_dtype=torch.float32
        )
    else:
        flux = _flux_checkpoint(encode)
        transformer = FluxTransformer2DModel.from_pretrained(flux.path, subfolder="transformer")
    tail = load_qwen2vl_tail(encode.qwen2vl, revision=encode.qwen2vl_revision)
    torch.manual_seed(seed)
    connector = Connector(tail.norm.weight.shape[0], transformer.config.joint_attention_dim)
    t5_embedder = None
    if text_branch == "t5":
        t5_embedder = _t5_embedder(encode, transformer, init_from)
    if init_from is not None:
        _load_package_weights(Path(init_from), tail=tail, connector=connector)
    return QwenFluxModel(tail, connector, transformer, t5_embedder)


def _t5_embedder(encode: EncodeConfig, transformer, init_from: Path | None) -> torch.nn.Linear:
    """Linear(T5 d_model -> FLUX inner width): the init package's, or fresh (the global seed)."""
    import json

    from safetensors.torch import load_file

    from components.inference.package import T5_EMBEDDER_FILE

    config = transformer.config
    inner = int(config.num_attention_heads * config.attention_head_dim)
    t5_config = _flux_checkpoint(encode).path / "text_encoder_2" / "config.json"
    if not t5_config.is_file():
        raise FileNotFoundError(
            f"{t5_config} is missing: the T5 text branch needs FLUX.1-dev's T5 (text_encoder_2/)"
        )
    embedder = torch.nn.Linear(int(json.loads(t5_config.read_text())["d_model"]), inner)
    carried = None if init_from is None else Path(init_from) / T5_EMBEDDER_FILE
    if carried is not None and carried.is_file():
        state = {key: value.float() for key, value in load_file(str(carried)).items()}
        embedder.load_state_dict(state, strict=True)
    return embedder


def _load_package_weights(package: Path, *, tail, connector: Connector) -> None:
    """The package's encoder tail (`layer.*`, `norm.*`) and connector, cast to float32."""
    from safetensors.torch import load_file

    from components.inference.package import CONNECTOR_FILE, TAIL_FILE

    state = {key: value.float() for key, value in load_file(str(package / TAIL_FILE)).items()}
    with torch.no_grad():
        for name, module in (("layer.", tail.layer), ("norm.", tail.norm)):
            part = {key[len(name) :]: value for key, value in state.items() if key.startswith(name)}
            module.load_state_dict(part, strict=True)
        weights = load_file(str(package / CONNECTOR_FILE))
        connector.load_state_dict({key: value.float() for key, value in weights.items()})


def latent_convention(
    encode: EncodeConfig, *, dataset_root: Path, device: torch.device | str = "cpu"
) -> LatentConvention:
    """The dataset's VAE factors (its manifest) and the empty prompt's pooled vector (on
    `device`)."""
    flux = _flux_checkpoint(encode)
    scaling, shift = shard_format.vae_factors(shard_format.read_manifest(dataset_root))
    return LatentConvention(
        codec=LatentCodec(scaling_factor=scaling, shift_factor=shift),
        empty_pooled_P=empty_prompt_pooled(flux.path).to(device),
    )


def load_training_model(
    encode: EncodeConfig,
    *,
    dataset_root: Path,
    seed: int,
    device: torch.device | str = "cpu",
    init_from: Path | None = None,
    text_branch: str = "qwen2vl",
) -> tuple[QwenFluxModel, LatentConvention]:
    """The start of a training (on the CPU: the bases, or the `init_from` package) and its
    convention (`device`)."""
    model = load_modules(encode, seed=seed, init_from=init_from, text_branch=text_branch)
    return model, latent_convention(encode, dataset_root=dataset_root, device=device)


def empty_prompt_pooled(flux_root: Path) -> torch.Tensor:
    """CLIP-L pooled vector of "" (what FLUX gets when no caption conditions the sample)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(flux_root, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(flux_root, subfolder="text_encoder").eval()
    return clip_pooled(tokenizer, encoder, [""])[0]


def _flux_checkpoint(encode: EncodeConfig):
    return resolve_checkpoint(
        encode.flux, revision=encode.flux_revision, root_file="model_index.json", required=()
    )
