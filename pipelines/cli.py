"""`qwenflux`: the command line of the pipeline.

    qwenflux run all|data|train|register|promote|infer --config PRESET [--from STEP] [--run-id ID]
                                                    the workflow: every step the target needs,
                                                    skipping unchanged ones, resuming a failed run
    qwenflux status [RUN_ID] --config PRESET       a workflow run's steps, outputs and links
    qwenflux submit --address http://HEAD:8265 [--wait] -- run all --config PRESET [...]
                                                    the workflow as a job on a Ray cluster
    qwenflux tiny-models --out DIR [--seed N]      build the tiny random checkpoints
    qwenflux data --config PRESET [--set k=v]      run or resume the data pipeline
    qwenflux data inspect [RUN_DIR] [--config PRESET] [--version N]
                                                    contact sheets per bucket and a counts chart
                                                    of a dataset version (default RUN_DIR:
                                                    run.root) under <RUN_DIR>/data/inspect/
    qwenflux train --config PRESET [--set k=v]     run or resume the three-stage fine-tune
    qwenflux register --config PRESET              package the trained model, gate, register
    qwenflux promote --config PRESET [--version N] candidate -> champion if it beats it
    qwenflux infer --config PRESET --model URI --requests FILE --out DIR
                                                    batch inference (Ray Data actors)
    qwenflux generate --config PRESET --model URI --mode M [--prompt ..] [--control JSON] --out DIR
                                                    one request, same code path
    qwenflux demo [--config tiny] [--set k=v]      tiny models, data, training, registry,
                                                    batch inference
    qwenflux import-release DIR --out PKG [--register NAME]
                                                    the released Qwen2vl-Flux folder as a package
    qwenflux export --format release --model URI --out DIR
                                                    a package in the released folder layout
    qwenflux diff-base URI [--flux DIR] [--qwen2vl DIR] [--json FILE]
                                                    what a model changed in its bases, per part
    qwenflux show-config --config PRESET           the resolved config, after overrides
    qwenflux plan [--config a100x8] [--set k=v]    memory, FLOPs and days per stage of a preset

The single-step commands below run one step outside any workflow run (no markers, no skipping).
Long-running commands (run, data, train, register, promote, infer, demo) are quiet: the terminal
shows their progress and summary, everything else goes to <run.root>/logs/<command>.log
(`--verbose` shows it all). Heavy libraries are imported inside the commands so
`qwenflux --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from pipelines.config_loading import ConfigError, to_plain
from pipelines.console import complain, quiet_run, say
from pipelines.environment import apply_quiet_environment
from pipelines.release_commands import add_release_commands, run_release_command

QUIET_COMMANDS = ("run", "data", "train", "register", "promote", "infer", "demo")
WORKFLOW_TARGETS = ("all", "data", "train", "register", "promote", "infer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenflux", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-models", help="build tiny random checkpoints")
    tiny.add_argument("--out", required=True, type=Path, help="output folder")
    tiny.add_argument("--seed", type=int, default=0)

    plan = commands.add_parser("plan", help="per-stage memory, FLOPs and days of a preset")
    plan.add_argument("--config", default="a100x8", help="preset name or TOML path")
    plan.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.resources.num_workers=4 or plan.mfu=0.4",
    )

    _add_submit(commands)

    configured = {}
    for name, help_text in (
        ("run", "run or resume the workflow up to a target step"),
        ("status", "show a workflow run's steps, outputs and links"),
        ("data", "run or resume the data pipeline"),
        ("train", "run or resume the three-stage fine-tune on Ray Train"),
        ("register", "export the trained model, run the gate, register a version"),
        ("promote", "move alias champion to the candidate if its gate beats the champion"),
        ("infer", "batch inference from a requests file (Parquet or JSONL)"),
        ("generate", "generate one image"),
        ("demo", "build tiny models, then run the embedded pipeline"),
        ("show-config", "print the resolved config"),
        ("import-release", "import the released Qwen2vl-Flux folder as a model package"),
        ("export", "write a model in another layout (--format release)"),
        ("diff-base", "which parameters of a model differ from its base checkpoints"),
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
        configured[name] = command
    _add_run_options(configured["run"])
    configured["status"].add_argument("run_id", nargs="?", default=None, help="default: latest")
    configured["promote"].add_argument("--version", help="version to promote (default: candidate)")
    _add_data_inspect(configured["data"])
    add_release_commands(configured)
    for name in QUIET_COMMANDS:
        configured[name].add_argument(
            "--verbose", action="store_true", help="show every library and Ray log line"
        )
    for name in ("infer", "generate"):
        configured[name].add_argument(
            "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a folder"
        )
        configured[name].add_argument("--out", required=True, type=Path, help="output folder")
    configured["infer"].add_argument("--requests", required=True, type=Path, help="requests file")
    one = configured["generate"]
    one.add_argument("--mode", required=True, help="text, variation, image_text, img2img, inpaint")
    one.add_argument("--id", default="generated", help="request id (the image file name)")
    for option in ("prompt", "image", "mask", "aspect", "focus", "control"):
        one.add_argument(f"--{option}", default=None)
    numbers = (("seed", int), ("steps", int), ("guidance", float), ("strength", float))
    for option, kind in (*numbers, ("cfg_scale", float)):
        one.add_argument(f"--{option.replace('_', '-')}", type=kind, default=None)
    return parser


def _add_submit(commands) -> None:
    submit = commands.add_parser("submit", help="submit a workflow run as a Ray job")
    submit.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_JOB_SUBMISSION_ADDRESS)",
    )
    submit.add_argument("--wait", action="store_true", help="stream the logs, return its status")
    submit.add_argument("--python", default="python", help="the cluster's interpreter")
    submit.add_argument("--working-dir", default="", help="code to upload (default: the image's)")
    submit.add_argument("workflow", nargs=argparse.REMAINDER, help="-- run TARGET --config ...")


def _add_data_inspect(data) -> None:
    # RUN_DIR goes right after `inspect`: argparse (3.11) cannot place an optional positional
    # that follows options.
    data.add_argument(
        "action", nargs="?", choices=("inspect",), default=None, help="inspect: draw the dataset"
    )
    data.add_argument(
        "run_dir", nargs="?", type=Path, default=None, help="inspect: run directory (run.root)"
    )
    data.add_argument(
        "--version", type=int, default=None, help="inspect: dataset version (default: latest)"
    )


def _add_run_options(run) -> None:
    run.add_argument("target", choices=WORKFLOW_TARGETS, help="last step to run")
    run.add_argument(
        "--from", dest="from_step", default=None, help="run this step and later ones afresh"
    )
    run.add_argument(
        "--run-id", default=None, help="workflow run id (default: resume or <preset>-<time>)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qwenflux` console script."""
    apply_quiet_environment()
    args = _parser().parse_args(argv)
    try:
        if args.command == "tiny-models":
            return _tiny_models(args.out, args.seed)
        if args.command == "plan":
            return _plan(args)
        if args.command == "submit":
            return _submit(args)
        from pipelines.config import load_config

        config = load_config(args.config, args.overrides)
        if args.command == "show-config":
            print(json.dumps(to_plain(config), indent=2))
            return 0
        if args.command == "status":
            return _status(config, args.run_id)
        if args.command == "data" and (args.action or args.version is not None):
            return _data_inspect(
                config, action=args.action, run_dir=args.run_dir, version=args.version
            )
        if args.command in QUIET_COMMANDS:
            return _quietly(config, args)
        if args.command in ("import-release", "export", "diff-base"):
            return run_release_command(config, args)
        return _generate(config, args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        complain(f"qwenflux: error: {error}")
        return 2


def _quietly(config, args: argparse.Namespace) -> int:
    """Run a long command with its full log in the run directory (see the module docstring)."""
    from pipelines.run_layout import RunLayout
    from pipelines.tracking_access import check_tracking_access

    layout = RunLayout(config)
    if args.command != "data":  # every other long command tracks or registers in MLflow
        check_tracking_access(layout.tracking_uri)
    log_file = layout.logs / f"{args.command}.log"
    with quiet_run(log_file, verbose=args.verbose) as logged:
        try:
            return _dispatch(config, args)
        except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:
            complain(f"qwenflux: error: {error}")
            if logged is not None:
                complain(f"full log: {logged}")
            return 2


def _dispatch(config, args: argparse.Namespace) -> int:
    commands = {
        "run": lambda: _run(config, args.target, run_id=args.run_id, from_step=args.from_step),
        "demo": lambda: _demo(config),
        "data": lambda: _data(config),
        "train": lambda: _train(config),
        "register": lambda: _register(config),
        "promote": lambda: _promote(config, args.version),
        "infer": lambda: _infer(config, args.model, args.requests, args.out),
    }
    return commands[args.command]()


def _run(config, target: str, *, run_id: str | None = None, from_step: str | None = None) -> int:
    """The workflow (pipelines/workflow.py); 0 when it finished, also when the gate refused the
    model (the register step's outputs say so)."""
    from pipelines.environment import submission_id
    from pipelines.ray_session import joins_cluster, ray_session
    from pipelines.run_layout import RunLayout
    from pipelines.workflow import run_workflow
    from pipelines.workflow_status import format_status
    from pipelines.workflow_steps import STEPS
    from pipelines.workflow_tracking import WorkflowTracker

    tracker = WorkflowTracker(config)
    # On a cluster the workflow holds one connection for all its steps. Locally each step starts
    # and stops its own in-process cluster: a shared one kept Ray Data's coordinator actors
    # of the data step alive and busy through training (about 7% slower on 2 cores).
    shared = (
        ray_session(config.run, temp_root=RunLayout(config).root)
        if joins_cluster(config.run)
        else contextlib.nullcontext("")
    )
    with shared as dashboard:
        record = run_workflow(
            config,
            target=target,
            steps=STEPS,
            tracker=tracker,
            run_id=run_id,
            from_step=from_step,
            annotations={"ray_dashboard": dashboard, "submission_id": submission_id()},
            report=say,
        )
    say(format_status(record, run_link=tracker.run_link))
    return 0


def _submit(args: argparse.Namespace) -> int:
    """Check the workflow command here (a typo fails before any job exists), then submit it."""
    from pipelines.config import load_config
    from pipelines.environment import job_submission_address
    from pipelines.submit import run_submit

    workflow = args.workflow[1:] if args.workflow[:1] == ["--"] else args.workflow
    inner = _parser().parse_args(workflow)
    if inner.command != "run":
        raise ConfigError("submit runs a workflow: give `-- run TARGET --config ...` after it")
    load_config(inner.config, inner.overrides)
    address = args.address or job_submission_address()
    if not address:
        raise ConfigError("submit needs --address http://HEAD:8265 (or RAY_JOB_SUBMISSION_ADDRESS)")
    return run_submit(
        workflow,
        address=address,
        wait=args.wait,
        python=args.python,
        working_dir=args.working_dir,
    )


def _status(config, run_id: str | None) -> int:
    from pipelines.run_layout import RunLayout
    from pipelines.workflow import WorkflowStore
    from pipelines.workflow_status import find_record, format_status
    from pipelines.workflow_tracking import WorkflowTracker

    record = find_record(WorkflowStore(RunLayout(config)), run_id)
    job = ""
    if record.get("submission_id") and record.get("ray_dashboard"):
        from pipelines.submit import job_state

        job = job_state(record["ray_dashboard"], record["submission_id"])
    print(format_status(record, run_link=WorkflowTracker(config).run_link, job_state=job))
    return 0


def _tiny_models(out: Path, seed: int) -> int:
    from components.tiny_models import build_tiny_models

    build_tiny_models(out, seed=seed)
    say(f"tiny models: {Path(out).resolve()}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pipelines.plan import plan_preset

    print(plan_preset(args.config, args.overrides).format())
    return 0


def _data(config) -> int:
    from pipelines.data import run_data

    summary = run_data(config)
    say(summary.format())
    return 0


def _data_inspect(config, *, action: str | None, run_dir: Path | None, version: int | None) -> int:
    from pipelines.data_inspect import inspect_dataset
    from pipelines.run_layout import RunLayout

    if action != "inspect":
        raise ConfigError("--version belongs to `qwenflux data inspect`")
    root = run_dir if run_dir is not None else RunLayout(config).root
    report = inspect_dataset(Path(root), version=version, seed=config.run.seed)
    say(report.format())
    return 0


def _train(config) -> int:
    from pipelines.train import run_training
    from pipelines.train_tracking import tracking_uri

    training = run_training(config)
    say(f"training {training.name} finished: {training.result.checkpoint.path}")
    say(f"MLflow: {tracking_uri(config)} (mlflow ui --backend-store-uri {tracking_uri(config)})")
    return 0


def _register(config) -> int:
    from pipelines.register import run_registration

    result = run_registration(config)
    say(result.format())
    return 0 if result.version is not None else 1


def _promote(config, version: str | None) -> int:
    from pipelines.register import run_promotion

    decision = run_promotion(config, version=version)
    say(decision.message)
    return 0


def _infer(config, model: str, requests: Path, out: Path) -> int:
    from pipelines.infer import run_inference

    summary = run_inference(config, model=model, requests=requests, out_dir=out)
    say(summary.format())
    return 0


def _generate(config, args: argparse.Namespace) -> int:
    from pipelines.infer import generate_one

    row = {"id": args.id, "mode": args.mode}
    options = ("prompt", "image", "mask", "aspect", "focus", "control", "seed", "steps")
    for option in (*options, "guidance", "cfg_scale"):
        if getattr(args, option) is not None:
            row[option] = getattr(args, option)
    if args.strength is not None:
        row["strength"] = args.strength
    result = generate_one(config, model=args.model, row=row, out_dir=args.out)
    if result["status"] != "ok":
        print(f"qwenflux: error: {result['error']}", file=sys.stderr)
        return 1
    print(f"image: {Path(args.out).resolve() / result['image_path']}")
    return 0


def _demo(config) -> int:
    from dataclasses import replace

    from pipelines.data import write_demo_corpus
    from pipelines.demo_requests import write_demo_requests
    from pipelines.run_layout import RunLayout

    qwen_dir = Path(config.data.encode.qwen2vl)
    flux_dir = Path(config.data.encode.flux)
    if qwen_dir.parent != flux_dir.parent:
        raise ConfigError("demo builds tiny models: data.encode.qwen2vl and .flux need one parent")
    if not any(source.kind == "synthetic" for source in config.data.sources):
        raise ConfigError(
            "demo needs a synthetic source in [[data.sources]]: its requests use the corpus"
        )
    _tiny_models(qwen_dir.parent, config.run.seed)
    layout = RunLayout(config)
    write_demo_corpus(config)
    requests = write_demo_requests(layout.demo_requests, data_root=layout.data.data)
    config = replace(config, infer=replace(config.infer, requests_file=str(requests)))
    _run(config, "all")
    registered = _latest_record(config)["steps"]["register"]["outputs"]["version"]
    say(f"\nrun directory: {layout.root}")
    say(f"shards:        {layout.dataset_root / 'shards'}")
    say(f"checkpoints:   {layout.train_storage}")
    say(f"inference:     {layout.inference}")
    say(f"MLflow UI:     mlflow ui --backend-store-uri {layout.tracking_uri}")
    say(f"status:        qwenflux status --config {config.run.name}")
    return 0 if registered is not None else 1


def _latest_record(config) -> dict:
    from pipelines.run_layout import RunLayout
    from pipelines.workflow import WorkflowStore
    from pipelines.workflow_status import find_record

    return find_record(WorkflowStore(RunLayout(config)), None)


if __name__ == "__main__":
    sys.exit(main())
