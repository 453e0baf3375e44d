"""Building the trained model and saving / restoring its training state.

Model: FLUX transformer from the diffusers-layout checkpoint, Qwen2-VL's last layer + norm read
alone from its sharded checkpoint, a fresh connector (seeded). Checkpoint folder (one per Ray
Train checkpoint): `weights.safetensors` (every parameter any stage so far trained, by name),
`optimizer.pt` (the current stage's AdamW state keyed by parameter name, loaded with
weights_only=True) and `state.json` (format, stage index, next step, guard state). The same
folder serves DDP and FSDP runs (components/training/fsdp.py gathers and scatters the tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.checkpoints import resolve_checkpoint
from components.data import shard_format
from components.training.encoder_tail import load_qwen2vl_tail
from components.training.fsdp import load_parameters
from components.training.objective import LatentConvention, QwenFluxModel
from model.conditioning import Connector

WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = 2
"""2: the optimizer state is keyed by parameter name (torch.distributed.checkpoint's full
state dict), so DDP and FSDP runs write and read the same checkpoints."""


@dataclass(frozen=True, slots=True)
class TrainState:
    """Where training stands: the stage, the next optimizer step, and what resumes it."""

    stage_index: int
    next_step: int
    optimizer_state: dict[str, Any]
    guard_state: dict[str, Any]


def build_model(config, *, dataset_root: Path) -> tuple[QwenFluxModel, LatentConvention]:
    """The trainable model from the configured checkpoints, and the latent convention of the
    dataset (its manifest) with the empty-prompt CLIP pooled vector."""
    from diffusers import FluxTransformer2DModel

    encode = config.data.encode
    flux = resolve_checkpoint(
        encode.flux, revision=encode.flux_revision, root_file="model_index.json", required=()
    )
    transformer = FluxTransformer2DModel.from_pretrained(flux.path, subfolder="transformer")
    tail = load_qwen2vl_tail(encode.qwen2vl, revision=encode.qwen2vl_revision)
    torch.manual_seed(config.run.seed)
    connector = Connector(tail.norm.weight.shape[0], transformer.config.joint_attention_dim)
    manifest = shard_format.read_manifest(dataset_root)
    encoders = manifest.get("encoders", {})
    convention = LatentConvention(
        scaling_factor=float(encoders["vae_scaling_factor"]),
        shift_factor=float(encoders["vae_shift_factor"]),
        empty_pooled_P=empty_prompt_pooled(flux.path),
    )
    return QwenFluxModel(tail, connector, transformer), convention


def empty_prompt_pooled(flux_root: Path) -> torch.Tensor:
    """CLIP-L pooled vector of "" (what FLUX gets when no caption conditions the sample)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(flux_root, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(flux_root, subfolder="text_encoder").eval()
    tokens = tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return encoder(input_ids=tokens.input_ids).pooler_output[0].float()


def save_train_state(folder: Path, *, weights: dict[str, torch.Tensor], state: TrainState) -> None:
    """Write a checkpoint folder (see the module docstring) from gathered full tensors."""
    save_file(weights, str(folder / WEIGHTS_FILE))
    torch.save(state.optimizer_state, folder / OPTIMIZER_FILE)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "stage_index": state.stage_index,
        "next_step": state.next_step,
        "guard": state.guard_state,
    }
    (folder / STATE_FILE).write_text(json.dumps(payload))


def load_train_state(checkpoint, model: QwenFluxModel) -> TrainState | None:
    """Restore weights into `model` (sharded or not) and return the state, or None without a
    checkpoint. Every worker calls it."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):
            if not (folder / name).exists():
                raise FileNotFoundError(f"checkpoint {folder} lacks {name}")
        payload = json.loads((folder / STATE_FILE).read_text())
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {folder} has format {payload.get('format')!r}; this trainer reads "
                f"format {CHECKPOINT_FORMAT} (start a new run.root or train.storage_path)"
            )
        load_parameters(model, load_file(str(folder / WEIGHTS_FILE)), source=f"checkpoint {folder}")
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    return TrainState(
        payload["stage_index"], payload["next_step"], optimizer_state, payload["guard"]
    )
