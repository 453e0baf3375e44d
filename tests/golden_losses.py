"""The training loop run in one process, without Ray, and its golden per-step losses.

`run_in_process` drives components/training/loop.py exactly as a Ray Train worker does (the
same model loading, held-out split and loop), with world size 1, one CPU thread and no MLflow.
The golden file holds "stage step loss" per line for the tiny preset's three stages at the
tests' short step counts on the tests' 48-row dataset. Regenerate it only on purpose (a change
meant to change the numbers), and say why in the commit:

    make golden          (runs: python tests/golden_losses.py --write)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN_FILE = Path(__file__).parent / "assets" / "golden_losses" / "tiny.txt"
DATASET_OVERRIDES = ("data.synthetic.count=48", "data.resources.chunk_size=16")
"""The tests' tiny dataset (tests/conftest.py::tiny_data_run builds the same one)."""


def run_in_process(config, *, dataset_root: Path, resume=None, publish=None):
    """(per-step losses, the loop) of training `config` on `dataset_root` in this process.
    `publish(folder, metrics)` sees every checkpoint (default: dropped)."""
    from components.training.loop import TrainingLoop
    from components.training.model_loading import load_training_model
    from pipelines.train_worker import loop_config

    torch.set_num_threads(1)
    device = torch.device("cpu")
    model, convention = load_training_model(
        config.data.encode,
        dataset_root=dataset_root,
        seed=config.run.seed,
        text_branch=config.train.text_branch,
    )
    loop = TrainingLoop(
        model,
        config=loop_config(config, device=device),
        convention=convention,
        data=_loop_data(config, dataset_root),
    )
    if resume is not None:
        from components.training.checkpoint_state import read_train_state

        resume = read_train_state(resume)
        loop.restore(resume)
    losses = loop.run(resume, sink=None, publish=publish or (lambda folder, metrics: None))
    return losses, loop


def _loop_data(config, dataset_root: Path):
    from components.training.loop import LoopData

    return LoopData.from_dataset(
        dataset_root, num_validation_samples=config.train.num_validation_samples, device="cpu"
    )


def golden_lines(config, losses: list[float]) -> list[str]:
    """'stage step loss' lines for the per-step losses of a whole run of `config`."""
    coordinates = [
        (stage.name, step) for stage in config.train.stages for step in range(stage.num_steps)
    ]
    if len(coordinates) != len(losses):
        raise ValueError(f"{len(losses)} losses for {len(coordinates)} steps")
    return [
        f"{name} {step} {loss:.9g}" for (name, step), loss in zip(coordinates, losses, strict=True)
    ]


def read_golden() -> list[tuple[str, int, float]]:
    rows = []
    for line in GOLDEN_FILE.read_text().splitlines():
        name, step, loss = line.split()
        rows.append((name, int(step), float(loss)))
    return rows


def _build_and_run(work: Path) -> list[str]:
    from conftest import tiny_config

    from components.tiny_models import build_tiny_models
    from pipelines.data import run_data

    models = build_tiny_models(work / "tiny_models", seed=0)
    config = tiny_config(work / "run", models, *DATASET_OVERRIDES)
    run_data(config, show_progress=False)
    losses, _ = run_in_process(config, dataset_root=Path(config.run.root) / "data")
    return golden_lines(config, losses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"overwrite {GOLDEN_FILE}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd() / ".tmp") as work:
        lines = _build_and_run(Path(work))
    print("\n".join(lines))
    if args.write:
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_FILE.write_text("\n".join(lines) + "\n")
        print(f"wrote {GOLDEN_FILE}")
    return 0


if __name__ == "__main__":
    from pipelines.environment import apply_quiet_environment

    apply_quiet_environment()
    sys.exit(main())
