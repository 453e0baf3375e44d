"""`qwenflux import-release` and `qwenflux export`: the released Qwen2vl-Flux layout in and out
(components/inference/release_package.py), with registration in MLflow for an import.

    qwenflux import-release DIR --out PKG [--register NAME] [--config P] [--set K=V]
    qwenflux export --format release --model URI --out DIR [--config P] [--set K=V]

An import registered with --register becomes a new version of NAME in the configured tracking
server, logged from a run of its own ("import <folder>") in the training experiment, tagged
`imported=true`, `imported_from` and `import.sha256.<file>` for every file read, and given no
alias: it has no gate result, so it is never a candidate until someone promotes it by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.console import say

EXPORT_FORMATS = ("release",)


def add_release_commands(configured: dict) -> None:
    """The two subcommands (each with --config / --set, added by the caller's loop)."""
    imported = configured["import-release"]
    imported.add_argument("source", type=Path, help="release folder (flux/, qwen2-vl/, ...)")
    imported.add_argument("--out", required=True, type=Path, help="package folder to write")
    imported.add_argument("--register", default=None, metavar="NAME", help="register as NAME")
    exported = configured["export"]
    exported.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    exported.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a folder"
    )
    exported.add_argument("--out", required=True, type=Path, help="folder to write")


def run_release_command(config, args: argparse.Namespace) -> int:
    if args.command == "import-release":
        return _import(config, args.source, args.out, register=args.register)
    return _export(config, args.model, args.out)


def _import(config, source: Path, out: Path, *, register: str | None) -> int:
    from components.inference.package import read_manifest
    from components.inference.release_package import import_release

    package = import_release(source, out)
    manifest = read_manifest(package)
    say(f"imported {source} -> package {package} (text_branch t5, {manifest['dtype']})")
    controlnet = manifest["import"].get("controlnet")
    if controlnet:
        say(f"its ControlNet: set infer.controlnet={controlnet} to use it")
    if register:
        version = register_import(config, package, name=register)
        say(f"registered as models:/{register}/{version} (tagged imported; no alias)")
    return 0


def register_import(config, package: Path, *, name: str) -> str:
    """Register an imported package as a new version of `name` (see the module docstring)."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    from components.inference.package import read_manifest
    from components.inference.registry import register_model
    from pipelines.train_tracking import experiment_id, tracking_uri

    record = read_manifest(package)["import"]
    uri = tracking_uri(config)
    client = MlflowClient(uri)
    run = client.create_run(
        experiment_id(client, config),
        run_name=f"import {Path(record['source']).name}",
        tags={"qwenflux.kind": "import", "imported_from": record["source"]},
    )
    tags = {"imported": "true", "imported_from": record["source"]}
    tags |= {f"import.sha256.{path}": sha for path, sha in sorted(record["files"].items())}
    try:
        version = register_model(
            package_dir=package,
            tracking_uri=uri,
            model_name=name,
            run_id=run.info.run_id,
            gate={},
            tags=tags,
            alias=None,
        )
    except BaseException:
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run.info.run_id)
    return version


def _export(config, model: str, out: Path) -> int:
    from components.inference.release_package import export_release
    from pipelines.infer import resolve_model
    from pipelines.run_layout import RunLayout

    reference = resolve_model(config, model, cache_dir=RunLayout(config).registry_cache)
    export_release(reference.package_dir, out)
    say(f"exported {model} in the released layout -> {out}")
    return 0
