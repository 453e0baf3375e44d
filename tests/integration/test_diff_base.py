"""`qwenflux diff-base` on packages trained on stage 1 alone: exactly stage 1's blocks (and the
encoder tail) differ from the tiny bases; with `flux_parts = ["attention"]` only attention does.
The training is the real loop in one process (tests/golden_losses.py), the package the real
export, and the comparison streams both sides' safetensors files."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from golden_losses import run_in_process
from release_fixture import build_tiny_release

from components.inference.diff_base import diff_package
from components.inference.package import export_package
from components.inference.release_package import import_release
from model.flux_stages import STAGE_BLOCKS
from pipelines.cli import main
from pipelines.register import generator_settings

pytestmark = pytest.mark.integration

DOUBLE_PARTS = ["attention", "mlp", "modulation", "norms"]
SINGLE_PARTS = ["attention", "mlp", "modulation", "norms", "output"]


def _stage_one_package(data_config, models, make_tiny_config, root: Path, *parts: str) -> Path:
    """A package from 3 steps of stage 1 (training `parts` of its blocks) on the tiny data."""
    overrides = [f"train.stages.1.flux_parts={json.dumps(list(parts))}"] if parts else []
    config = make_tiny_config(
        root / "run",
        models,
        "train.stages.1.num_steps=3",
        "train.stages.1.warmup_steps=1",
        "train.stages.1.decay_steps=1",
        *overrides,
    )
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, stages=config.train.stages[:1])
    )
    final = root / "checkpoint"

    def keep_last(folder, metrics):
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(folder, final)

    dataset_root = Path(data_config.run.root) / "data"
    run_in_process(config, dataset_root=dataset_root, publish=keep_last)
    return export_package(
        checkpoint_dir=final,
        qwen2vl=str(models.qwen2vl),
        qwen2vl_revision=None,
        flux=str(models.flux),
        flux_revision=None,
        settings=generator_settings(data_config),
        lineage={"training_run_id": "stage-1-only"},
        out_dir=root / "package",
    )


@pytest.fixture(scope="module")
def packages(tiny_data_run, tiny_models_dir, make_tiny_config, tmp_path_factory):
    data_config, _ = tiny_data_run
    return {
        name: _stage_one_package(
            data_config, tiny_models_dir, make_tiny_config, tmp_path_factory.mktemp(name), *parts
        )
        for name, parts in (("all", ()), ("attention", ("attention",)))
    }


def _diff(package, models):
    return diff_package(package, flux_base=models.flux, qwen2vl_base=models.qwen2vl)


def test_stage_one_changes_exactly_its_blocks_the_tail_and_the_connector(packages, tiny_models_dir):
    report = _diff(packages["all"], tiny_models_dir)
    assert report.changed_blocks() == sorted(STAGE_BLOCKS[1])
    for block, parts in report.changed_parts().items():
        assert parts == (DOUBLE_PARTS if block < 19 else SINGLE_PARTS), block
    outside = {block for block, _ in report.flux if not block.isdigit()}
    assert {"x_embedder", "context_embedder", "proj_out"} <= outside
    assert not any(d.changed for (block, _), d in report.flux.items() if not block.isdigit())
    assert sorted(report.tail) == ["attention", "final norm", "mlp", "norms"]
    assert all(diff.changed and 0 < diff.relative_change < 1 for diff in report.tail.values())
    assert set(report.new) == {"connector"}
    totals = report.changed_params()
    stage_params = sum(
        diff.params
        for (block, _), diff in report.flux.items()
        if block.isdigit() and int(block) in STAGE_BLOCKS[1]
    )
    assert totals["flux"] == stage_params


def test_attention_only_changes_only_attention(packages, tiny_models_dir):
    report = _diff(packages["attention"], tiny_models_dir)
    assert report.changed_parts() == {block: ["attention"] for block in sorted(STAGE_BLOCKS[1])}
    changed = [diff for (block, part), diff in report.flux.items() if diff.changed]
    # Every attention weight of the stage's blocks moved, not just some of its entries.
    assert all(diff.changed == diff.params for diff in changed)


def test_the_cli_compares_with_the_recorded_bases_and_writes_json(
    packages, tiny_models_dir, make_tiny_config, tmp_path, capsys
):
    out = tmp_path / "diff.json"
    config_root = tmp_path / "cli"
    overrides = [f"run.root={config_root}"]
    code = main(
        ["diff-base", str(packages["attention"]), "--json", str(out)]
        + [arg for override in overrides for arg in ("--set", override)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"changed blocks: {sorted(STAGE_BLOCKS[1])}" in printed
    assert "block    1 attention" in printed and "block    1 mlp" not in printed
    written = json.loads(out.read_text())
    assert written["changed_blocks"] == sorted(STAGE_BLOCKS[1])
    assert written == json.loads(
        json.dumps(_diff(packages["attention"], tiny_models_dir).as_dict())
    )


def test_the_imported_release_against_the_stock_bases(tiny_models_dir, tmp_path, capsys):
    """An imported release records its own folders as bases, so by default nothing differs and
    the command says to name the stock ones; against them the tiny release's one nudged block
    is all that changed (the rest is the base in bf16), beside its connector and T5 embedder."""
    source = build_tiny_release(tmp_path / "release", tiny_models_dir)
    package = import_release(source, tmp_path / "imported")
    options = ["--set", f"run.root={tmp_path / 'cli'}"]
    assert main(["diff-base", str(package), *options]) == 0
    printed = capsys.readouterr().out
    assert "changed blocks: []" in printed and "name the stock checkpoints" in printed
    stock = ["--flux", str(tiny_models_dir.flux), "--qwen2vl", str(tiny_models_dir.qwen2vl)]
    out = tmp_path / "diff.json"
    assert main(["diff-base", str(package), *stock, "--json", str(out), *options]) == 0
    written = json.loads(out.read_text())
    assert written["changed_blocks"] == [1]
    assert not any(part["changed"] for part in written["tail"].values())
    assert set(written["new"]) == {"connector", "t5_embedder"}
