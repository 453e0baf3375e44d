"""`train.init_from`: the model package a training starts from, resolved and checked against the
dataset before any worker starts.

The package's transformer, Qwen2-VL tail and connector become the starting weights
(components/training/model_loading.py). The dataset's cached states come from a frozen Qwen2-VL
prefix, and the package's tail was trained on top of its own base's prefix: the two must be the
same bit for bit, so the sha256 of the prefix tensors recorded by the data run
(manifest.encoders.qwen2vl_prefix_sha256) must equal the package's
(bases.qwen2vl.prefix_sha256; computed from its base for packages that predate the field).
"""

from __future__ import annotations

from pathlib import Path

from components.data import shard_format


class InitFromMismatchError(ValueError):
    """The dataset was encoded by another Qwen2-VL prefix than the package was trained on."""


def resolve_init_package(config) -> Path | None:
    """The package folder train.init_from names (a registry version is downloaded into the run
    directory's registry cache), or None without init_from."""
    if not config.train.init_from:
        return None
    from pipelines.infer import resolve_model
    from pipelines.run_layout import RunLayout

    reference = resolve_model(
        config, config.train.init_from, cache_dir=RunLayout(config).registry_cache
    )
    return Path(reference.package_dir)


def check_init_package(package: Path, manifest: dict, *, dataset_root: Path) -> dict[str, str]:
    """Refuse a package whose Qwen2-VL prefix differs from the dataset's; returns the lineage
    tags of the start ({init_from_package, init_from_imported when it came from a release})."""
    from components.inference.package import read_manifest
    from components.training.encoder_tail import qwen2vl_prefix_sha256

    where = dataset_root / shard_format.MANIFEST_NAME
    encoded = manifest.get("encoders", {}).get("qwen2vl_prefix_sha256")
    if not encoded:
        raise InitFromMismatchError(
            f"{where}: the dataset does not record the hash of the Qwen2-VL prefix that encoded "
            "it (made before this check existed): re-run the data step, then train from "
            f"{package}"
        )
    record = read_manifest(package)
    base = record["bases"]["qwen2vl"]
    ours = base.get("prefix_sha256") or qwen2vl_prefix_sha256(base["id"])
    if ours != encoded:
        raise InitFromMismatchError(
            f"train.init_from: package {package} was trained on the Qwen2-VL prefix of "
            f"{base['id']} (sha256 {ours[:12]}...), but {where} was encoded by "
            f"{manifest.get('encoders', {}).get('qwen2vl')} (prefix sha256 {encoded[:12]}...): "
            "its tail would replay states it never saw. Encode the data with the package's "
            "Qwen2-VL (data.encode.qwen2vl) or start from another package"
        )
    lineage = {"init_from_package": str(package)}
    imported = record.get("import", {}).get("source")
    if imported:
        lineage["init_from_imported"] = str(imported)
    return lineage
