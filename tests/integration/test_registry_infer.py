"""After training, through the registry into batch inference, on the session's tiny trained run:
gate -> package -> registered version (@candidate) -> promote (@champion) -> `run_inference` over
the demo's requests (every mode, plus bad requests) -> PNGs + results table; rerun skips
finished ids; same seed + same version gives the same image."""

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.demo_requests import write_demo_requests
from pipelines.infer import generate_one, run_inference
from pipelines.register import run_promotion, run_registration
from pipelines.train_tracking import tracking_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD_IDS = {
    "text-red-circle",
    "variation-0",
    "variation-1-seed-3",
    "image-text-0",
    "img2img-0",
    "inpaint-0",
    "focus-circle-0",
    "focus-grid-1",
    "wide-text",
    "control-depth-0",
    "control-line-1",
}
BAD_FIELDS = {
    "bad-mode": "mode",
    "bad-missing-file": "image",
    "bad-mask-size": "mask",
    "bad-focus": "focus",
    "bad-control": "control",
}


@pytest.fixture(scope="module")
def registered(tiny_trained_run):
    config, _ = tiny_trained_run
    return config, run_registration(config)


def test_conditioning_checks_fail_the_untrained_model_and_a_20_step_one_fails_variation(
    registered,
):
    # The demo's preset checks on the tests' 48-row set. The control is the untrained start,
    # which must score near chance on both. The session's 20-step model must fail variation
    # (which needs a few hundred steps); its text accuracy is printed, not asserted (measured
    # 0.21 over 48, needs 0.28; 0.38 with guidance 3, which the preset uses for variation only).
    from components.evaluation.gate import conditioning_checks
    from components.inference.package import load_package
    from components.training.model_loading import load_training_model
    from pipelines.config import load_config
    from pipelines.register import evaluate_gate, gate_inputs
    from pipelines.run_layout import RunLayout

    config, result = registered
    check = load_config("tiny").registry.conditioning
    assert check.modes == ("variation", "text") and check.variation_cfg_scale > 1
    strict = dataclasses.replace(
        config, registry=dataclasses.replace(config.registry, conditioning=check)
    )
    parts = load_package(result.package_dir)
    gate = evaluate_gate(strict, parts)
    print(gate.message())
    text, variation = sorted(gate.checks, key=lambda check: check.mode)
    assert variation.num_samples >= 2 * len(check.class_words)
    present = len(check.class_words) - len(text.skipped_classes)
    assert text.num_samples == check.seeds_per_class * present
    assert not variation.passed and not gate.passed
    assert "conditioning check variation FAILED" in gate.message()
    assert gate.validation_loss == pytest.approx(result.gate.validation_loss)
    assert gate.metrics()["conditioning_variation_accuracy"] == variation.accuracy
    assert gate.metrics()["conditioning_text_accuracy"] == text.accuracy

    untrained, convention = load_training_model(
        strict.data.encode, dataset_root=RunLayout(strict).dataset_root, seed=strict.run.seed
    )
    untrained.eval()
    untrained_parts = dataclasses.replace(
        parts,
        transformer=untrained.transformer,
        tail=untrained.tail,
        connector=untrained.connector,
    )
    for untrained_check in conditioning_checks(
        untrained_parts, untrained, convention=convention, inputs=gate_inputs(strict)
    ):
        print("untrained:", untrained_check.message())
        assert not untrained_check.passed


@pytest.fixture(scope="module")
def requests_file(tiny_data_run, tmp_path_factory):
    data_config, _ = tiny_data_run
    return write_demo_requests(
        tmp_path_factory.mktemp("requests"), data_root=Path(data_config.run.root) / "data"
    )


def test_gate_passes_and_registers_one_candidate_with_lineage(registered):
    config, result = registered
    print(result.format())
    assert result.gate.passed and result.version is not None
    client = MlflowClient(tracking_uri(config))
    version = client.get_model_version(config.registry.model_name, result.version)
    assert "candidate" in version.aliases
    assert version.tags["training_run_id"] == result.training_run_id
    for key in ("git_sha", "config_hash", "data_manifest_id"):
        assert version.tags[key]
    metrics = client.get_run(result.training_run_id).data.metrics
    assert metrics["gate.validation_loss"] == pytest.approx(result.gate.validation_loss)
    again = run_registration(config)
    assert again.version == result.version, "a rerun registered a second version"


def test_batch_inference_runs_every_mode_and_reports_bad_requests(
    registered, requests_file, tmp_path
):
    config, result = registered
    decision = run_promotion(config)
    print(decision.message)
    model = f"models:/{config.registry.model_name}@champion"
    out = tmp_path / "out"
    summary = run_inference(
        config, model=model, requests=requests_file, out_dir=out, show_progress=False
    )
    print(summary.format())
    assert summary.model.version == result.version
    assert (summary.ok, summary.failed, summary.skipped) == (len(GOOD_IDS), len(BAD_FIELDS), 0)
    rows = {row["id"]: row for row in pq.read_table(out / "results.parquet").to_pylist()}
    assert set(rows) == GOOD_IDS | set(BAD_FIELDS)
    for identifier in GOOD_IDS:
        row = rows[identifier]
        assert row["status"] == "ok", row
        with Image.open(out / row["image_path"]) as image:
            assert image.size == (row["width"], row["height"])
        assert row["model_version"] == result.version
    for identifier, field in BAD_FIELDS.items():
        assert rows[identifier]["status"] == "error"
        assert rows[identifier]["error_field"] == field, rows[identifier]
    assert rows["wide-text"]["width"] == 2 * rows["wide-text"]["height"]

    rerun = run_inference(
        config, model=model, requests=requests_file, out_dir=out, show_progress=False
    )
    assert (rerun.ok, rerun.skipped) == (0, len(GOOD_IDS)), "the rerun redid finished ids"


def test_same_seed_and_version_give_the_same_image(registered, requests_file, tmp_path):
    config, result = registered
    model = f"models:/{config.registry.model_name}/{result.version}"
    row = {"mode": "variation", "image": str(requests_file.parent / "reference-0.png")}
    images = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        done = generate_one(
            config, model=model, row={**row, "id": name, "seed": seed}, out_dir=tmp_path / name
        )
        assert done["status"] == "ok", done
        images.append((tmp_path / name / done["image_path"]).read_bytes())
    assert images[0] == images[1]
    assert images[0] != images[2]


def test_generate_command_writes_one_image_and_reports_a_bad_request(
    registered, requests_file, tmp_path, capsys
):
    from pipelines.cli import main

    config, result = registered
    encode, infer = config.data.encode, config.infer
    base = ["--config", "tiny", "--set", f"run.root={config.run.root}"]
    for key, value in (
        ("data.encode.qwen2vl", encode.qwen2vl),
        ("data.encode.flux", encode.flux),
        ("infer.controlnet", infer.controlnet),
        ("infer.depth_detector", infer.depth_detector),
    ):
        base += ["--set", f"{key}={value}"]
    model = ["--model", f"models:/{config.registry.model_name}/{result.version}"]
    reference = str(requests_file.parent / "reference-1.png")
    control = json.dumps([{"kind": "line", "image": reference, "strength": 0.5}])
    good = ["--mode", "text", "--prompt", "a red circle", "--control", control, "--seed", "5"]
    assert main(["generate", *base, *model, *good, "--out", str(tmp_path / "good")]) == 0
    assert "image:" in capsys.readouterr().out
    assert (tmp_path / "good" / "images" / "generated.png").is_file()
    bad = ["--mode", "variation", "--image", str(tmp_path / "missing.png")]
    assert main(["generate", *base, *model, *bad, "--out", str(tmp_path / "bad")]) == 1
    assert "missing.png" in capsys.readouterr().err
