"""Between the released Qwen2vl-Flux layout (components/inference/release.py) and our model
package (components/inference/package.py), both ways.

`import_release(release_dir, out_dir)`: a package, format 2, text_branch "t5", whose frozen bases
are the release's own flux/ and qwen2-vl/ folders (hashed like any base), holding the release's
transformer (files copied byte for byte), Qwen2-VL's last layer + final norm (the tail), the
connector and the T5 embedder as safetensors, in the release's dtype. package.json's `import`
records the source folder and the sha256 of every file the import read.

`export_release(package_dir, out_dir)`: the released layout and file names, so the authors'
loading code and the tools built on it load the package: flux/ (the package's FLUX base with
the package's transformer), qwen2-vl/ (the package's Qwen2-VL base without lm_head, its last
layer and final norm replaced by the package's tail), qwen2-vl/connector.pt (`linear.weight`,
`linear.bias`) and qwen2-vl/t5_embedder.pt (`weight`, `bias`) as plain state dicts. Both write
into a staging folder renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.checkpoints import FileHashCache, write_staged
from components.inference import release
from components.inference.generator_parts import GeneratorSettings
from components.inference.package import (
    CONNECTOR_FILE,
    PACKAGE_FORMAT,
    T5_EMBEDDER_FILE,
    TAIL_FILE,
    TRANSFORMER_DIR,
    PackageError,
    base_record,
    flux_files,
    qwen2vl_files,
    qwen2vl_weight_files,
    read_manifest,
    resolve_base,
    tail_state,
    verified_base,
    write_manifest,
)
from components.training.encoder_tail import (
    load_qwen2vl_tail,
    locate_tail,
    qwen2vl_prefix_sha256,
)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_QWEN2VL_INDEX = "model.safetensors.index.json"


def import_release(release_dir: Path, out_dir: Path, *, lineage: dict[str, str] | None = None):
    """Import the release at `release_dir` as a package at `out_dir` (which must not exist);
    returns out_dir. ReleaseError for an incomplete release or a refused pickle (checked before
    anything is written)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"package folder {out_dir} already exists")
    layout = release.find_release(release_dir)
    pickles = release.read_release_pickles(layout)
    connector = pickles["connector"]
    # The release's dtype is kept (bf16 as published); anything else is widened losslessly.
    dtype = connector["weight"].dtype if connector["weight"].dtype in DTYPE_NAMES else torch.float32
    hashes = FileHashCache(out_dir.parent)
    qwen_id, flux_id = str(layout.qwen2vl.absolute()), str(layout.flux.absolute())
    bases = {
        "qwen2vl": base_record(
            qwen_id, None, resolve_base("qwen2vl", qwen_id, None), qwen2vl_files, hashes
        ),
        "flux": base_record(
            flux_id,
            None,
            resolve_base("flux", flux_id, None),
            lambda root: flux_files(root, text_branch="t5"),
            hashes,
        ),
    }
    sources = release.source_hashes(layout, hashes)
    hashes.save()
    bases["qwen2vl"]["prefix_sha256"] = qwen2vl_prefix_sha256(qwen_id)
    tail = load_qwen2vl_tail(qwen_id, dtype=dtype)
    vae = json.loads((layout.flux / "vae" / "config.json").read_text())
    settings = GeneratorSettings(
        instruction=release.RELEASE_INSTRUCTION,
        image_tokens=release.RELEASE_IMAGE_TOKENS,
        prompt_image_tokens=release.RELEASE_PROMPT_IMAGE_TOKENS,
        vae_scaling_factor=float(vae["scaling_factor"]),
        vae_shift_factor=float(vae["shift_factor"]),
        guidance=release.RELEASE_GUIDANCE,
        text_branch="t5",
    )
    t5 = pickles["t5_embedder"]
    manifest = {
        "format": PACKAGE_FORMAT,
        "settings": dataclasses.asdict(settings),
        "connector": _dims(connector),
        "t5_embedder": _dims(t5),
        "dtype": DTYPE_NAMES[dtype],
        "lineage": {"imported_from": str(layout.root.absolute()), **(lineage or {})},
        "checkpoint": {},
        "import": {
            "source": str(layout.root.absolute()),
            "files": sources,
            "controlnet": str(layout.controlnet.absolute()) if layout.controlnet else None,
        },
        "bases": bases,
    }

    def write(staging: Path) -> None:
        release.copy_transformer(layout.flux, staging / TRANSFORMER_DIR)
        save_file(tail_state(tail), str(staging / TAIL_FILE), {"format": "pt"})
        save_file(_cast(connector, dtype), str(staging / CONNECTOR_FILE), {"format": "pt"})
        save_file(_cast(t5, dtype), str(staging / T5_EMBEDDER_FILE), {"format": "pt"})
        write_manifest(staging, manifest)

    write_staged(out_dir, write)
    return out_dir


def export_release(package_dir: Path, out_dir: Path, *, hash_cache_dir: Path | None = None):
    """Write the package at `package_dir` in the released layout at `out_dir` (which must not
    exist); returns out_dir. The package's bases are verified first (as load_package does).
    PackageError for a package without a T5 embedder: the authors' code loads
    qwen2-vl/t5_embedder.pt unconditionally."""
    package_dir, out_dir = Path(package_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"release folder {out_dir} already exists")
    manifest = read_manifest(package_dir)
    if not (package_dir / T5_EMBEDDER_FILE).is_file():
        raise PackageError(
            f"package {package_dir} has no {T5_EMBEDDER_FILE} (text_branch "
            f"{manifest['settings'].get('text_branch', 'qwen2vl')!r}): the released layout's "
            f"qwen2-vl/{release.T5_EMBEDDER_PICKLE} cannot be written, and the authors' loader "
            "requires it"
        )
    hashes = FileHashCache(Path(hash_cache_dir) if hash_cache_dir else package_dir.parent)
    qwen_base = verified_base(package_dir, "qwen2vl", manifest["bases"]["qwen2vl"], hashes)
    flux_base = verified_base(package_dir, "flux", manifest["bases"]["flux"], hashes)
    hashes.save()
    tail = load_file(str(package_dir / TAIL_FILE))
    connector = load_file(str(package_dir / CONNECTOR_FILE))
    t5 = load_file(str(package_dir / T5_EMBEDDER_FILE))

    def write(staging: Path) -> None:
        flux = staging / release.FLUX_DIR
        shutil.copytree(flux_base, flux, ignore=_top_level(flux_base, {TRANSFORMER_DIR}))
        shutil.copytree(package_dir / TRANSFORMER_DIR, flux / TRANSFORMER_DIR)
        qwen = staging / release.QWEN2VL_DIR
        _write_qwen2vl(qwen_base, qwen, tail)
        linear = {"linear.weight": connector["weight"], "linear.bias": connector["bias"]}
        torch.save(linear, qwen / release.CONNECTOR_PICKLE)
        torch.save({"weight": t5["weight"], "bias": t5["bias"]}, qwen / release.T5_EMBEDDER_PICKLE)

    write_staged(out_dir, write)
    return out_dir


def _write_qwen2vl(base: Path, out: Path, tail: dict[str, torch.Tensor]) -> None:
    """The base Qwen2-VL folder without lm_head, its last layer and final norm from `tail`
    (package names `layer.*`, `norm.*`); shards keep their names, the index is rewritten."""
    weights = {path.name for path in qwen2vl_weight_files(base)}
    shutil.copytree(base, out, ignore=_top_level(base, weights))
    location = locate_tail(base, name=str(base))
    located = location.weight_map
    # {checkpoint name: package tail name}, in the base's naming (legacy `model.` or nested).
    names = {location.checkpoint_name(key): key for key in tail}
    if set(names) - set(located):
        raise PackageError(f"base {base} lacks {sorted(set(names) - set(located))[:3]}")
    written: dict[str, str] = {}
    total_bytes = 0
    for shard in sorted(set(located.values())):
        tensors = load_file(str(base / shard))
        kept = {key: value for key, value in tensors.items() if not key.startswith("lm_head.")}
        for key in kept.keys() & names.keys():
            kept[key] = tail[names[key]].contiguous()
        if kept:
            save_file(kept, str(out / shard), {"format": "pt"})
        written |= dict.fromkeys(kept, shard)
        total_bytes += sum(value.numel() * value.element_size() for value in kept.values())
    if (base / _QWEN2VL_INDEX).is_file():
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": dict(sorted(written.items())),
        }
        (out / _QWEN2VL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _top_level(root: Path, names: set[str]) -> Callable[[str, list[str]], set[str]]:
    """A copytree ignore that skips `names` directly under root only."""
    root = Path(root).absolute()

    def ignore(folder: str, entries: list[str]) -> set[str]:
        return names & set(entries) if Path(folder).absolute() == root else set()

    return ignore


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype).contiguous() for key, value in state.items()}


def _dims(state: dict[str, torch.Tensor]) -> dict[str, int]:
    out_features, in_features = state["weight"].shape
    return {"in_features": int(in_features), "out_features": int(out_features)}
