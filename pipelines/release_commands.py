"""`qwenflux import-release` and `qwenflux export`: the released Qwen2vl-Flux layout in and out
(components/inference/release_package.py), with registration in MLflow for an import; and
`qwenflux diff-base`: what a model changed in its base checkpoints
(components/inference/diff_base.py).

    qwenflux import-release DIR --out PKG [--register NAME] [--config P] [--set K=V]
    qwenflux export --format release --model URI --out DIR [--config P] [--set K=V]
    qwenflux diff-base URI [--flux DIR] [--qwen2vl DIR] [--json FILE] [--config P] [--set K=V]

diff-base compares with the bases the package records (verified by their hashes) unless --flux /
--qwen2vl name others; an imported release records its own folders, so name the stock FLUX.1-dev
and Qwen2-VL checkpoints to see what the release changed.

An import registered with --register becomes a new version of NAME in the configured tracking
server, logged from a run of its own ("import <folder>") in the training experiment, tagged
`imported=true`, `imported_from` and `import.sha256.<file>` for every file read, and given no
alias: it has no gate result, so it is never a candidate until someone promotes it by hand.
"""

from __future__ import annotations

import argparse
import json
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
    diffed = configured["diff-base"]
    diffed.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a folder")
    diffed.add_argument("--flux", default=None, help="FLUX base (default: the package's)")
    diffed.add_argument("--qwen2vl", default=None, help="Qwen2-VL base (default: the package's)")
    diffed.add_argument("--json", default=None, type=Path, help="also write the report as JSON")


def run_release_command(config, args: argparse.Namespace) -> int:
    if args.command == "import-release":
        return _import(config, args.source, args.out, register=args.register)
    if args.command == "diff-base":
        return _diff_base(config, args)
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


def _diff_base(config, args: argparse.Namespace) -> int:
    from components.checkpoints import FileHashCache
    from components.inference.diff_base import diff_package
    from components.inference.package import read_manifest, resolve_base, verified_base
    from pipelines.infer import resolve_model
    from pipelines.run_layout import RunLayout

    reference = resolve_model(config, args.model, cache_dir=RunLayout(config).registry_cache)
    package = reference.package_dir
    bases = read_manifest(package)["bases"]
    hashes = FileHashCache(package.parent)
    chosen = {}
    for kind, given in (("flux", args.flux), ("qwen2vl", args.qwen2vl)):
        if given is None:
            chosen[kind] = verified_base(package, kind, bases[kind], hashes)
        else:
            chosen[kind] = resolve_base(kind, given, None).path
    report = diff_package(package, flux_base=chosen["flux"], qwen2vl_base=chosen["qwen2vl"])
    say(f"{args.model} against FLUX {chosen['flux']} and Qwen2-VL {chosen['qwen2vl']}")
    say(report.format())
    if not report.changed_blocks() and "import" in read_manifest(package):
        say(
            "an imported release records its own folders as its bases: name the stock "
            "checkpoints with --flux and --qwen2vl to see what it changed"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        temporary.replace(args.json)
        say(f"wrote {args.json}")
    return 0
