"""The released Qwen2vl-Flux checkpoint's folder layout, read safely, and imported as a package.

The layout (the authors' model repository; their inference code reads it this way):
  flux/                a full diffusers FLUX.1-dev folder: transformer/ (sharded safetensors +
                       index, complete, not a delta), vae/, text_encoder/ + tokenizer/ (CLIP-L),
                       text_encoder_2/ + tokenizer_2/ (T5-XXL), scheduler/, model_index.json
  qwen2-vl/            a whole Qwen2-VL saved without lm_head (`visual.*`, `model.layers.*`,
                       `model.embed_tokens.*`, `model.norm.*`), tokenizer, chat template,
                       preprocessor_config.json
  qwen2-vl/connector.pt    torch pickle: state dict of Linear(3584, 4096): `linear.weight`,
                           `linear.bias` (bf16), keys possibly prefixed `module.`
  qwen2-vl/t5_embedder.pt  torch pickle: state dict of Linear(4096, 3072): `weight`, `bias`
  controlnet/          optional: a diffusers FluxControlNetModel folder (union modes)
The authors' code opens both pickles under qwen2-vl/; a copy with them beside flux/ at the top
is read too. Pickles are only ever opened with torch.load(weights_only=True), must hold exactly
the expected keys at the expected shapes, and are stored as safetensors in the package: anything
else is refused with a ReleaseError naming the file (a missing connector included: the authors'
code silently keeps a random one, we do not).

`import_release` writes a model package (components/inference/package.py, format 2,
text_branch "t5") whose frozen bases are the release's own flux/ and qwen2-vl/ folders.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from components.checkpoints import FileHashCache
from components.inference.package import qwen2vl_weight_files

FLUX_DIR = "flux"
QWEN2VL_DIR = "qwen2-vl"
CONTROLNET_DIR = "controlnet"
CONNECTOR_PICKLE = "connector.pt"
T5_EMBEDDER_PICKLE = "t5_embedder.pt"
RELEASE_INSTRUCTION = "Describe this image."
RELEASE_IMAGE_TOKENS = 512
"""Image tokens of a reference image without a prompt (512*28*28 pixels)."""
RELEASE_PROMPT_IMAGE_TOKENS = 256
"""Image tokens of a reference image next to a text prompt (256*28*28 pixels)."""
RELEASE_GUIDANCE = 3.5
_PREFIX = "module."
_FLUX_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class ReleaseError(ValueError):
    """A release folder that is incomplete, or a file in it that is refused."""


@dataclass(frozen=True, slots=True)
class ReleaseLayout:
    """Where the parts of one release folder are (checked to exist)."""

    root: Path
    flux: Path
    qwen2vl: Path
    connector: Path
    t5_embedder: Path
    controlnet: Path | None

    def source_files(self) -> list[Path]:
        """Every file whose bytes the import reads into the package (hashed as lineage)."""
        transformer = sorted((self.flux / "transformer").glob("*"))
        return [path for path in transformer if path.is_file()] + [
            self.connector,
            self.t5_embedder,
            *qwen2vl_weight_files(self.qwen2vl),
        ]


def find_release(root: Path) -> ReleaseLayout:
    """The release layout under `root`; ReleaseError naming the first part that is missing."""
    root = Path(root)
    if not root.is_dir():
        raise ReleaseError(f"release folder {root} does not exist")
    flux, qwen2vl = root / FLUX_DIR, root / QWEN2VL_DIR
    for folder, marker in ((flux, "model_index.json"), (qwen2vl, "config.json")):
        if not (folder / marker).is_file():
            raise ReleaseError(f"release {root}: {folder} lacks {marker}")
    for part in _FLUX_PARTS:
        if not (flux / part).is_dir():
            raise ReleaseError(f"release {root}: {flux} lacks {part}/")
    if not qwen2vl_weight_files(qwen2vl):
        raise ReleaseError(f"release {root}: {qwen2vl} holds no model*.safetensors")
    controlnet = root / CONTROLNET_DIR
    return ReleaseLayout(
        root=root,
        flux=flux,
        qwen2vl=qwen2vl,
        connector=_pickle_path(root, CONNECTOR_PICKLE),
        t5_embedder=_pickle_path(root, T5_EMBEDDER_PICKLE),
        controlnet=controlnet if (controlnet / "config.json").is_file() else None,
    )


def _pickle_path(root: Path, name: str) -> Path:
    for candidate in (root / QWEN2VL_DIR / name, root / name):
        if candidate.is_file():
            return candidate
    raise ReleaseError(
        f"release {root}: {name} is missing (looked in {root / QWEN2VL_DIR} and {root}); "
        "without it the model cannot be rebuilt, so nothing is imported"
    )


def read_state_pickle(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of a torch-pickled state dict, read with weights_only=True (no code runs).

    `expected` maps each key (after dropping a `module.` prefix, as DataParallel saves them) to
    its shape. ReleaseError naming the file for anything else: a pickle that needs more than
    plain tensors and containers, not a mapping of names to floating tensors, a missing or
    unexpected key, a shape that differs.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ReleaseError(
            f"{path}: refused: not a weights-only state dict ({type(error).__name__}: "
            f"{first[:300]})"
        ) from None
    if not isinstance(state, dict):
        raise ReleaseError(f"{path}: refused: holds a {type(state).__name__}, not a state dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(_PREFIX) if isinstance(key, str) else key
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ReleaseError(f"{path}: refused: entry {key!r} is not a named tensor")
        if name in tensors:
            raise ReleaseError(
                f"{path}: refused: {name!r} appears twice (with and without module.)"
            )
        tensors[name] = value
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ReleaseError(
            f"{path}: refused: expected keys {sorted(expected)}, missing {missing}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape) or not tensor.is_floating_point():
            raise ReleaseError(
                f"{path}: refused: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected a "
                f"floating tensor of shape {tuple(shape)}"
            )
    return {name: tensors[name].contiguous() for name in expected}


def release_dims(layout: ReleaseLayout) -> dict[str, int]:
    """The widths the release's pickles must fit, from its configs: Qwen2-VL hidden size,
    FLUX joint_attention_dim and inner width, T5 d_model."""
    qwen = json.loads((layout.qwen2vl / "config.json").read_text())
    text = qwen.get("text_config") or {}
    flux = json.loads((layout.flux / "transformer" / "config.json").read_text())
    t5 = json.loads((layout.flux / "text_encoder_2" / "config.json").read_text())
    return {
        "qwen2vl_hidden": int(text.get("hidden_size") or qwen["hidden_size"]),
        "joint_attention_dim": int(flux["joint_attention_dim"]),
        "flux_inner": int(flux["num_attention_heads"]) * int(flux["attention_head_dim"]),
        "t5_d_model": int(t5["d_model"]),
    }


def read_release_pickles(layout: ReleaseLayout) -> dict[str, dict[str, torch.Tensor]]:
    """{"connector": {weight, bias}, "t5_embedder": {weight, bias}} from the release's pickles
    (the connector's `linear.` names mapped to our Connector's)."""
    dims = release_dims(layout)
    hidden, joint, inner = dims["qwen2vl_hidden"], dims["joint_attention_dim"], dims["flux_inner"]
    connector = read_state_pickle(
        layout.connector, {"linear.weight": (joint, hidden), "linear.bias": (joint,)}
    )
    t5 = read_state_pickle(
        layout.t5_embedder, {"weight": (inner, dims["t5_d_model"]), "bias": (inner,)}
    )
    return {
        "connector": {"weight": connector["linear.weight"], "bias": connector["linear.bias"]},
        "t5_embedder": t5,
    }


def source_hashes(layout: ReleaseLayout, hashes: FileHashCache) -> dict[str, str]:
    """{path relative to the release root: sha256} of every file the import reads."""
    return {
        path.relative_to(layout.root).as_posix(): hashes.sha256(path)
        for path in layout.source_files()
    }


def copy_transformer(flux: Path, destination: Path) -> None:
    """The release's transformer/ files, copied byte for byte (config, index, shards)."""
    destination.mkdir(parents=True)
    for path in sorted((flux / "transformer").iterdir()):
        if path.is_file():
            shutil.copy2(path, destination / path.name)
