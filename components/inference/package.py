"""Model package: a trained checkpoint + references to its frozen bases, ready for inference.

Input of export_package: a training checkpoint folder (components/training/checkpoint_state.py:
its `transformer.*`, `tail.*`, `connector.*` parameters, raw or their EMA) and the Qwen2-VL /
FLUX bases it was trained from. Output: one folder, written atomically:
  transformer/              the whole trained FluxTransformer2DModel (diffusers save_pretrained)
  encoder_tail.safetensors  Qwen2-VL's trained last layer + final norm (`layer.*`, `norm.*`)
  connector.safetensors     the trained Connector (`weight`, `bias`)
  t5_embedder.safetensors   only with settings.text_branch "t5": the Linear from T5's width to
                            FLUX's inner width (`weight`, `bias`) of the released model's T5 branch
  package.json              format, GeneratorSettings, connector (and T5 embedder) dims, dtype,
                            lineage, and for each frozen base (NOT copied): id, revision id,
                            sha256 of every file read
load_package resolves the bases, verifies those hashes and returns GeneratorParts. Format 2 added
the T5 branch (a format-1 package reads as text_branch "qwen2vl").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.checkpoints import (
    CheckpointNotFoundError,
    FileHashCache,
    ResolvedCheckpoint,
    resolve_checkpoint,
    write_staged,
)
from components.data.t5_states import T5_FOLDERS
from components.inference.generator_parts import GeneratorParts, GeneratorSettings
from components.inference.package_checkpoint import (
    PackageError,
    apply_checkpoint,
    checkpoint_linear,
    checkpoint_summary,
)
from components.training.checkpoint_state import STATE_FILE
from components.training.distributed_checkpoint import checkpoint_weights
from components.training.encoder_tail import load_qwen2vl_tail, qwen2vl_prefix_sha256
from model.conditioning import Connector
from model.qwen2vl_tail import Qwen2VLTail

PACKAGE_FORMAT = 2
READ_FORMATS = (1, 2)
PACKAGE_FILE = "package.json"
TRANSFORMER_DIR = "transformer"
TAIL_FILE = "encoder_tail.safetensors"
CONNECTOR_FILE = "connector.safetensors"
T5_EMBEDDER_FILE = "t5_embedder.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PACKAGE_WEIGHTS = ("raw", "ema")
"""Which of a checkpoint's weights a package carries: the trained ones, or their EMA."""
QWEN2VL_AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
"""Qwen2-VL files besides the weights that loading the prefix, tokenizer and processor reads
(hashed when present)."""
FLUX_FOLDERS = ("vae", "text_encoder", "tokenizer")
"""FLUX folders the generator reads (every file hashed). transformer/ is shipped in the package;
text_encoder_2/ and tokenizer_2/ (T5) are read only by the T5 branch (T5_FOLDERS)."""
_FLUX_REQUIRED = (
    "transformer/diffusion_pytorch_model",
    "vae/diffusion_pytorch_model",
    "text_encoder/model",
    "tokenizer/",
)


class PackageIntegrityError(PackageError):
    """A frozen base file the package recorded is missing or has a different sha256."""


def export_package(
    *,
    checkpoint_dir: Path,
    qwen2vl: str,
    qwen2vl_revision: str | None,
    flux: str,
    flux_revision: str | None,
    settings: GeneratorSettings,
    lineage: dict[str, str],
    out_dir: Path,
    dtype: str = "float32",
    t5_embedder: Path | None = None,
    weights: str = "raw",
) -> Path:
    """Apply a training checkpoint to its bases and write a package folder at out_dir.

    The T5 embedder: the checkpoint's trained one (`t5_embedder.*`, a training on the T5 text
    branch), else `t5_embedder`, a package's t5_embedder.safetensors to carry along (a training
    on the Qwen2-VL branch that started from an imported release keeps the released T5
    embedder, untrained, so the package can be exported to the released layout); the package's
    text branch is the settings' own, and "t5" without any T5 embedder is a PackageError.

    qwen2vl / flux are the bases as training named them (local dir or hub id in the local HF
    cache). dtype ('float32' or 'bfloat16') is how the trained networks are stored; weights
    ('raw' or 'ema') which of the checkpoint's weights the package carries. out_dir must
    not exist; it appears only complete (staging folder + os.replace), never half-written.
    Errors: PackageError for an unknown / misshapen tensor or a checkpoint without the connector,
    CheckpointNotFoundError for a missing checkpoint or base.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"package folder {out_dir} already exists")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    trained = _trained_weights(Path(checkpoint_dir), weights)
    qwen_base = resolve_base("qwen2vl", qwen2vl, qwen2vl_revision)
    flux_base = resolve_base("flux", flux, flux_revision)
    bases = _base_records(
        (qwen2vl, qwen2vl_revision, qwen_base),
        (flux, flux_revision, flux_base),
        text_branch=settings.text_branch,
        hash_cache_dir=out_dir.parent,
    )
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(flux_base.path, subfolder="transformer")
    tail = load_qwen2vl_tail(qwen2vl, revision=qwen2vl_revision)
    connector = Connector(tail.norm.weight.shape[0], transformer.config.joint_attention_dim)
    modules = {"transformer": transformer, "tail": tail, "connector": connector}
    trained_t5 = checkpoint_linear(trained, "t5_embedder.")
    if trained_t5 is not None:
        modules["t5_embedder"] = trained_t5
    apply_checkpoint(trained, modules, source=str(checkpoint_dir))
    del trained
    if dtype != "float32":
        for module in modules.values():
            module.to(DTYPES[dtype])
    manifest = {
        "format": PACKAGE_FORMAT,
        "settings": dataclasses.asdict(settings),
        "connector": {"in_features": connector.in_features, "out_features": connector.out_features},
        "dtype": dtype,
        "lineage": dict(lineage),
        "checkpoint": checkpoint_summary(Path(checkpoint_dir)) | {"weights": weights},
        "bases": bases,
    }
    carried = _t5_embedder_state(modules.pop("t5_embedder", None), t5_embedder)
    if carried is not None:
        out_features, in_features = carried["weight"].shape
        manifest["t5_embedder"] = {"in_features": in_features, "out_features": out_features}
    elif settings.text_branch == "t5":
        raise PackageError(
            f"checkpoint {checkpoint_dir}: text_branch 't5' needs a t5_embedder, and neither "
            "the checkpoint nor the package it started from has one"
        )
    _write_atomically(out_dir, modules, manifest, t5_embedder=carried)
    return out_dir


def _base_records(qwen2vl, flux, *, text_branch: str, hash_cache_dir: Path) -> dict:
    """package.json's bases: each (name, revision, resolved) with the sha256 of every file the
    generator reads (T5's too on the T5 branch), and the Qwen2-VL prefix hash."""
    hashes = FileHashCache(hash_cache_dir)
    bases = {
        "qwen2vl": base_record(*qwen2vl, qwen2vl_files, hashes),
        "flux": base_record(*flux, lambda root: flux_files(root, text_branch=text_branch), hashes),
    }
    hashes.save()
    bases["qwen2vl"]["prefix_sha256"] = qwen2vl_prefix_sha256(qwen2vl[2].path)
    return bases


def _trained_weights(checkpoint_dir: Path, weights: str) -> dict[str, torch.Tensor]:
    """The checkpoint's trained parameters by name: raw, or their EMA."""
    if weights not in PACKAGE_WEIGHTS:
        raise ValueError(f"weights must be one of {list(PACKAGE_WEIGHTS)}, got {weights!r}")
    if not (checkpoint_dir / STATE_FILE).is_file():
        raise CheckpointNotFoundError(f"training checkpoint {checkpoint_dir} lacks {STATE_FILE}")
    return checkpoint_weights(checkpoint_dir, ema=weights == "ema")


def _t5_embedder_state(trained: nn.Module | None, carried: Path | None) -> dict | None:
    """The package's T5 embedder: the checkpoint's trained one, else the carried file's."""
    if trained is not None:
        return {k: v.detach().contiguous() for k, v in trained.state_dict().items()}
    return None if carried is None else load_file(str(carried))


def load_package(
    package_dir: Path, *, name: str = "", version: str = "", hash_cache_dir: Path | None = None
) -> GeneratorParts:
    """Verify a package's frozen bases and load its trained networks (eval mode, no grad).

    Every base file the package recorded is checked against its sha256. Hashing a 7B checkpoint
    (~15 GB) at every start is slow, so verified hashes are cached in
    `<hash_cache_dir or package_dir's parent>/base_file_hashes.json`, keyed by (absolute path,
    size, mtime_ns). What the cache trusts: a file whose path, size and mtime_ns are unchanged
    since it was hashed still holds the same bytes (an in-place rewrite that keeps the size and
    restores the mtime is not seen), and the cache file itself is written only by this code (who
    can edit it can make a changed file pass). Use a fresh hash_cache_dir to re-hash everything.
    Errors: PackageError (bad package.json, unknown format, missing or misshapen weights),
    CheckpointNotFoundError (a base is missing), PackageIntegrityError (a base file is missing or
    its sha256 differs; the message names the file and both hashes).
    """
    package_dir = Path(package_dir)
    manifest = read_manifest(package_dir)
    try:
        settings = GeneratorSettings(**manifest["settings"])
        bases = manifest["bases"]
        dims = manifest["connector"]
        dtype = DTYPES[manifest["dtype"]]
        qwen_record, flux_record = bases["qwen2vl"], bases["flux"]
        for record in (qwen_record, flux_record):
            if not {"id", "revision_id"} <= record.keys() or not isinstance(record["files"], dict):
                raise KeyError(f"a base record needs id, revision_id and files: {record}")
    except (KeyError, TypeError, ValueError) as error:
        raise PackageError(f"package {package_dir}: {PACKAGE_FILE} is invalid: {error!r}") from None
    hashes = FileHashCache(Path(hash_cache_dir) if hash_cache_dir else package_dir.parent)
    qwen_path = verified_base(package_dir, "qwen2vl", qwen_record, hashes)
    flux_path = verified_base(package_dir, "flux", flux_record, hashes)
    hashes.save()
    for relative in (f"{TRANSFORMER_DIR}/config.json", TAIL_FILE, CONNECTOR_FILE):
        if not (package_dir / relative).is_file():
            raise PackageError(f"package {package_dir} lacks {relative}")
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(
        package_dir / TRANSFORMER_DIR, torch_dtype=dtype
    )
    tail = _load_tail(qwen_path, package_dir / TAIL_FILE)
    connector = _load_connector(package_dir / CONNECTOR_FILE, dims)
    t5_embedder = None
    if settings.text_branch == "t5":
        t5_embedder = _load_linear(package_dir / T5_EMBEDDER_FILE, manifest.get("t5_embedder"))
    expected = (tail.norm.weight.shape[0], transformer.config.joint_attention_dim)
    if (connector.in_features, connector.out_features) != expected:
        raise PackageError(
            f"package {package_dir}: connector {connector.in_features} -> "
            f"{connector.out_features} does not fit the bases ({expected[0]} -> {expected[1]})"
        )
    for module in (transformer, tail, connector, t5_embedder):
        if module is not None:
            module.eval().requires_grad_(False)
    return GeneratorParts(
        qwen2vl_path=qwen_path,
        flux_path=flux_path,
        transformer=transformer,
        tail=tail,
        connector=connector,
        t5_embedder=t5_embedder,
        settings=settings,
        name=name,
        version=version,
    )


def read_manifest(package_dir: Path) -> dict:
    """package.json of a package (format checked); PackageError when missing or corrupt."""
    path = Path(package_dir) / PACKAGE_FILE
    if not path.is_file():
        raise PackageError(f"package {package_dir} lacks {PACKAGE_FILE}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PackageError(f"package {package_dir}: corrupt {PACKAGE_FILE}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READ_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PackageError(
            f"package {package_dir}: {PACKAGE_FILE} has format {found!r}; this code reads "
            f"formats {', '.join(map(str, READ_FORMATS))}"
        )
    return manifest


def resolve_base(kind: str, name: str, revision: str | None) -> ResolvedCheckpoint:
    if kind == "qwen2vl":
        return resolve_checkpoint(
            name, revision=revision, root_file="config.json", required=("model",)
        )
    return resolve_checkpoint(
        name, revision=revision, root_file="model_index.json", required=_FLUX_REQUIRED
    )


def qwen2vl_weight_files(root: Path) -> list[Path]:
    """A Qwen2-VL checkpoint's weight files: the index and every shard it lists, or the single
    model.safetensors; [] when there is neither."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [index, *(root / shard for shard in shards)]
    single = root / "model.safetensors"
    return [single] if single.is_file() else []


def qwen2vl_files(root: Path) -> list[str]:
    """config + weights (qwen2vl_weight_files; model.safetensors, reported missing later, when
    there are none) + tokenizer, processor and chat-template files that exist."""
    weights = [path.name for path in qwen2vl_weight_files(root)] or ["model.safetensors"]
    aux = [name for name in QWEN2VL_AUX_FILES if (root / name).is_file()]
    return sorted(set(aux + weights))


def flux_files(root: Path, *, text_branch: str = "qwen2vl") -> list[str]:
    """model_index.json and every file of the FLUX folders the generator reads."""
    files = ["model_index.json"]
    folders = FLUX_FOLDERS + (T5_FOLDERS if text_branch == "t5" else ())
    for folder in folders:
        files += [
            path.relative_to(root).as_posix()
            for path in sorted((root / folder).rglob("*"))
            if path.is_file()
        ]
    return files


def base_record(name, revision, resolved: ResolvedCheckpoint, list_files, hashes) -> dict:
    return {
        "id": name,
        "revision": revision,
        "revision_id": resolved.revision_id,
        "files": {rel: hashes.sha256(resolved.path / rel) for rel in list_files(resolved.path)},
    }


def verified_base(package_dir: Path, kind: str, record: dict, hashes: FileHashCache) -> Path:
    """Resolve a recorded base at its exact revision and check every recorded file's sha256."""
    revision_id = record["revision_id"]
    # A hub base is pinned to the commit it was exported from; a local one has no revision.
    revision = None if revision_id.startswith("local:") else revision_id
    try:
        resolved = resolve_base(kind, record["id"], revision)
    except (CheckpointNotFoundError, ValueError) as error:
        raise CheckpointNotFoundError(
            f"package {package_dir}: frozen base {kind} {record['id']!r} (revision "
            f"{revision_id}) is not available: {error}"
        ) from None
    for relative, recorded in sorted(record["files"].items()):
        path = resolved.path / relative
        if not path.is_file():
            raise PackageIntegrityError(
                f"package {package_dir}: frozen base {kind} file {path} is missing "
                f"(recorded sha256 {recorded})"
            )
        actual = hashes.sha256(path)
        if actual != recorded:
            raise PackageIntegrityError(
                f"package {package_dir}: frozen base {kind} file {path} has sha256 {actual}, "
                f"the package recorded {recorded}"
            )
    return resolved.path


def tail_state(tail: nn.Module) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().contiguous()
        for key, value in tail.state_dict().items()
        if key.startswith(("layer.", "norm."))
    }


def _write_atomically(
    out_dir: Path,
    modules: dict[str, nn.Module],
    manifest: dict,
    *,
    t5_embedder: dict[str, torch.Tensor] | None = None,
) -> None:
    def write(staging: Path) -> None:
        modules["transformer"].save_pretrained(staging / TRANSFORMER_DIR, safe_serialization=True)
        save_file(tail_state(modules["tail"]), str(staging / TAIL_FILE), {"format": "pt"})
        connector = {
            k: v.detach().contiguous() for k, v in modules["connector"].state_dict().items()
        }
        save_file(connector, str(staging / CONNECTOR_FILE), {"format": "pt"})
        if t5_embedder is not None:
            save_file(t5_embedder, str(staging / T5_EMBEDDER_FILE), {"format": "pt"})
        write_manifest(staging, manifest)

    write_staged(out_dir, write)


def write_manifest(folder: Path, manifest: dict) -> None:
    """package.json, as every package writer lays it out."""
    (folder / PACKAGE_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _load_tail(qwen_path: Path, tail_file: Path) -> Qwen2VLTail:
    """Qwen2VLTail of the base's architecture holding the package's tensors (strict keys)."""
    from transformers import Qwen2VLConfig

    text_config = Qwen2VLConfig.from_pretrained(qwen_path).text_config
    text_config._attn_implementation = "sdpa"
    tail = Qwen2VLTail.skeleton(text_config)
    state = load_file(str(tail_file))
    try:
        tail.layer.load_state_dict(_strip(state, "layer."), strict=True, assign=True)
        tail.norm.load_state_dict(_strip(state, "norm."), strict=True, assign=True)
    except RuntimeError as error:
        raise PackageError(f"{tail_file} does not fit base {qwen_path}: {error}") from None
    extra = sorted(key for key in state if not key.startswith(("layer.", "norm.")))
    if extra:
        raise PackageError(f"{tail_file}: unexpected tensors {extra[:3]}")
    return tail


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _load_linear(path: Path, dims: dict | None) -> nn.Linear:
    """A Linear(in_features, out_features) holding `weight` and `bias` of a safetensors file."""
    if not path.is_file() or not isinstance(dims, dict):
        raise PackageError(f"{path.parent}: text_branch 't5' needs {path.name} and its dims")
    with torch.device("meta"):
        linear = nn.Linear(int(dims["in_features"]), int(dims["out_features"]))
    try:
        linear.load_state_dict(load_file(str(path)), strict=True, assign=True)
    except RuntimeError as error:
        raise PackageError(f"{path} does not fit {PACKAGE_FILE}: {error}") from None
    return linear


def _load_connector(connector_file: Path, dims: dict) -> Connector:
    state = load_file(str(connector_file))
    with torch.device("meta"):
        connector = Connector(int(dims["in_features"]), int(dims["out_features"]))
    try:
        connector.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise PackageError(f"{connector_file} does not fit {PACKAGE_FILE}: {error}") from None
    return connector
