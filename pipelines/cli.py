"""`qwenflux`: the command line of the pipeline.

    qwenflux tiny-models --out DIR [--seed N]      build the tiny random checkpoints
    qwenflux data --config PRESET [--set k=v]      run or resume the data pipeline
    qwenflux train --config PRESET [--set k=v]     run or resume the three-stage fine-tune
    qwenflux demo [--config tiny] [--set k=v]      tiny models, then data and training
    qwenflux show-config --config PRESET           the resolved config, after overrides
    qwenflux plan [--config a100x8] [--gpus N]     real-scale memory, FLOPs and days per stage

Heavy libraries are imported inside the commands so `qwenflux --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.config_loading import ConfigError, to_plain
from pipelines.environment import apply_quiet_environment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenflux", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-models", help="build tiny random checkpoints")
    tiny.add_argument("--out", required=True, type=Path, help="output folder")
    tiny.add_argument("--seed", type=int, default=0)

    plan = commands.add_parser("plan", help="per-stage memory, FLOPs and days at real scale")
    plan.add_argument("--config", default="a100x8", help="preset name or TOML path")
    plan.add_argument("--gpus", type=int, default=None, help="GPUs (default 8)")
    plan.add_argument("--global-batch", type=int, default=None, help="samples/step (default 128)")
    plan.add_argument("--mfu", type=float, default=None, help="assumed MFU (default 0.35)")

    for name, help_text in (
        ("data", "run or resume the data pipeline"),
        ("train", "run or resume the three-stage fine-tune on Ray Train"),
        ("demo", "build tiny models, then run the embedded pipeline"),
        ("show-config", "print the resolved config"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default="tiny", help="preset name or TOML path")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set data.resources.num_encoders=4",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qwenflux` console script."""
    apply_quiet_environment()
    args = _parser().parse_args(argv)
    try:
        if args.command == "tiny-models":
            return _tiny_models(args.out, args.seed)
        if args.command == "plan":
            return _plan(args)
        from pipelines.config import load_config

        config = load_config(args.config, args.overrides)
        if args.command == "show-config":
            print(json.dumps(to_plain(config), indent=2))
            return 0
        if args.command == "demo":
            return _demo(config)
        if args.command == "train":
            return _train(config)
        return _data(config)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"qwenflux: error: {error}", file=sys.stderr)
        return 2


def _tiny_models(out: Path, seed: int) -> int:
    from components.tiny_models import build_tiny_models

    paths = build_tiny_models(out, seed=seed)
    print(f"tiny models in {out}: {paths}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pipelines.plan import plan_preset

    report = plan_preset(
        args.config, num_gpus=args.gpus, global_batch=args.global_batch, mfu=args.mfu
    )
    print(report.format())
    return 0


def _data(config) -> int:
    from pipelines.data import run_data

    summary = run_data(config)
    print(summary.format())
    return 0


def _train(config) -> int:
    from pipelines.train import run_training
    from pipelines.train_tracking import tracking_uri

    result = run_training(config)
    print(f"training finished: {result.checkpoint}")
    print(f"MLflow: {tracking_uri(config)} (mlflow ui --backend-store-uri {tracking_uri(config)})")
    return 0


def _demo(config) -> int:
    qwen_dir = Path(config.data.encode.qwen2vl)
    flux_dir = Path(config.data.encode.flux)
    if qwen_dir.parent != flux_dir.parent:
        raise ConfigError("demo builds tiny models: data.encode.qwen2vl and .flux need one parent")
    _tiny_models(qwen_dir.parent, config.run.seed)
    _data(config)
    _train(config)
    root = Path(config.run.root).resolve()
    print(f"\nrun directory: {root}")
    print(f"shards:        {root / 'data' / 'shards'}")
    print(f"checkpoints:   {root / 'train'}")
    print(f"MLflow UI:     mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
