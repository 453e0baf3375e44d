"""One request schema on every path: the MLflow pyfunc model (QwenFluxPyfunc, directly and
through mlflow.pyfunc.load_model with its signature) answers focus and control requests with
the same PNG bytes as batch inference's InferenceWorker for the same seed, and rejects rows over
the limits with the same field. Batch inference keeps every rejected row, duplicate ids included,
in its results table.

Both load one package exported from the untrained tiny parts (connector seeded 0) plus the tiny
ControlNet and depth estimator; images are 32 px and sampling takes 2 Euler steps.
"""

import io
import json

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from checkpoint_files import write_checkpoint
from mlflow.pyfunc import PythonModelContext
from PIL import Image

from components.inference.package import export_package
from components.inference.registry import (
    PACKAGE_ARTIFACT,
    PYFUNC_MODEL_CONFIG,
    PYFUNC_RESULT_COLUMNS,
    QwenFluxPyfunc,
    request_signature,
)
from components.inference.request_rows import RESULT_COLUMNS
from components.inference.request_schema import REQUEST_FIELDS
from pipelines.infer import InferenceWorker

pytestmark = pytest.mark.integration

REQUESTS = {"max_side_px": 128, "steps": 2, "max_prompt_tokens": 12, "max_guidance": 10.0}
"""The same RequestDefaults for both paths ([infer.requests] / model_config "requests")."""
FOCUS = {"rows": 2, "columns": 2, "cells": [[0, 0], [1, 1]]}
PROMPT = "a red circle in the centre"


def _picture(width: int, height: int) -> Image.Image:
    """Smooth shading with a square (edges for the line detector, depth for the estimator)."""
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.stack([60 + 3 * columns, 40 + 3 * rows, np.full_like(rows, 90)], axis=-1)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (230, 30, 30)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core box: one thread is fastest
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def package(tiny_models_dir, make_untrained_parts, tmp_path_factory):
    """A package whose checkpoint holds only the untrained parts' connector."""
    parts = make_untrained_parts(tiny_models_dir)
    root = tmp_path_factory.mktemp("pyfunc_package")
    weights = {f"connector.{name}": value for name, value in parts.connector.state_dict().items()}
    write_checkpoint(root / "checkpoint", weights)
    return export_package(
        checkpoint_dir=root / "checkpoint",
        qwen2vl=str(tiny_models_dir.qwen2vl),
        qwen2vl_revision=None,
        flux=str(tiny_models_dir.flux),
        flux_revision=None,
        settings=parts.settings,
        lineage={"training_run_id": "untrained"},
        out_dir=root / "package",
    )


@pytest.fixture(scope="module")
def frozen_bases(tiny_models_dir) -> dict[str, str]:
    return {
        "controlnet": str(tiny_models_dir.controlnet),
        "depth_detector": str(tiny_models_dir.depth),
    }


@pytest.fixture(scope="module")
def requests_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyfunc_requests") / "requests"
    folder.mkdir()
    _picture(48, 64).save(folder / "reference.png")
    _picture(32, 32).save(folder.parent / "outside.png")
    return folder


@pytest.fixture(scope="module")
def worker(package, frozen_bases, requests_dir, tmp_path_factory):
    return InferenceWorker(
        package_dir=str(package),
        name="untrained",
        version="local",
        device="cpu",
        compute_dtype="float32",
        out_dir=str(tmp_path_factory.mktemp("pyfunc_batch_out")),
        base_dir=str(requests_dir),
        defaults=REQUESTS,
        **frozen_bases,
    )


@pytest.fixture(scope="module")
def pyfunc(package, frozen_bases) -> QwenFluxPyfunc:
    model = QwenFluxPyfunc()
    config = {**frozen_bases, "requests": REQUESTS}
    model.load_context(PythonModelContext({PACKAGE_ARTIFACT: str(package)}, config))
    return model


def _batch_rows() -> list[dict]:
    """Rows as a requests file holds them (paths, focus and control as objects)."""
    control = [{"kind": "depth", "image": "reference.png", "strength": 0.8}]
    return [
        {
            "id": "focus-grid",
            "mode": "variation",
            "image": "reference.png",
            "focus": FOCUS,
            "aspect": "32x48",
        },
        {
            "id": "control-depth",
            "mode": "text",
            "prompt": PROMPT,
            "control": control,
            "aspect": "32x32",
            "seed": 4,
        },
        {
            "id": "control-line-focus",
            "mode": "variation",
            "image": "reference.png",
            "focus": {"center_x": 0.3, "center_y": 0.6, "radius": 0.4},
            "control": [{"kind": "line", "image": "reference.png", "strength": 0.5}],
            "aspect": "32x48",
            "seed": 5,
        },
    ]


def _as_pyfunc_row(row: dict, folder) -> dict:
    """The same request as a pyfunc client sends it: image bytes, focus as JSON text."""
    sent = dict(row)
    if "image" in sent:
        sent["image"] = (folder / sent["image"]).read_bytes()
    if "focus" in sent:
        sent["focus"] = json.dumps(sent["focus"])
    if "control" in sent:
        controls = [dict(item) for item in sent["control"]]
        for control in controls:
            control["image"] = (folder / control["image"]).read_bytes()
        sent["control"] = controls
    return sent


def _pyfunc_frame(rows: list[dict], folder) -> pd.DataFrame:
    sent = [_as_pyfunc_row(row, folder) for row in rows]
    # A list column needs None, not a missing key (NaN), where a row has no control.
    return pd.DataFrame([{"control": None} | row for row in sent])


def test_focus_and_control_requests_give_the_batch_images_byte_for_byte(
    worker, pyfunc, requests_dir
):
    rows = _batch_rows()
    batch = [worker.run_one(row, request_row=index) for index, row in enumerate(rows)]
    answers = pyfunc.predict(None, _pyfunc_frame(rows, requests_dir))
    assert list(answers.columns) == list(PYFUNC_RESULT_COLUMNS)
    for row, result, answer in zip(rows, batch, answers.to_dict("records"), strict=True):
        assert result["status"] == "ok" and answer["status"] == "ok", (result, answer)
        for column in RESULT_COLUMNS:
            assert answer[column] == result[column], (row["id"], column)
        image_bytes = (worker.out_dir / result["image_path"]).read_bytes()
        assert answer["png"] == image_bytes, row["id"]
        with Image.open(io.BytesIO(answer["png"])) as image:
            assert image.size == (result["width"], result["height"])
    assert batch[0]["steps"] == REQUESTS["steps"] and batch[1]["seed"] == 4
    without_focus = {key: value for key, value in rows[0].items() if key != "focus"}
    unfocused = pyfunc.predict(None, _pyfunc_frame([without_focus], requests_dir))
    assert unfocused["png"][0] != answers["png"][0], "the focus changed nothing"


def test_both_paths_reject_rows_over_the_limits_with_the_same_field(worker, pyfunc, requests_dir):
    long_prompt = " ".join(["red circle"] * 12)  # a few characters, more than 12 tokens
    rows = [
        ({"id": "long", "mode": "text", "prompt": long_prompt}, "prompt"),
        ({"id": "huge", "mode": "text", "prompt": "x" * 100_000}, "prompt"),
        ({"id": "strong", "mode": "text", "prompt": PROMPT, "guidance": 12.0}, "guidance"),
        ({"id": "cfg", "mode": "text", "prompt": PROMPT, "cfg_scale": 25.0}, "cfg_scale"),
        (
            {"id": "badfocus", "mode": "variation", "image": "reference.png", "focus": {"rows": 2}},
            "focus",
        ),
    ]
    answers = pyfunc.predict(None, _pyfunc_frame([row for row, _ in rows], requests_dir))
    for (row, field), answer in zip(rows, answers.to_dict("records"), strict=True):
        result = worker.run_one(row)
        assert (result["status"], result["error_field"]) == ("error", field), result
        assert (answer["status"], answer["error_field"], answer["png"]) == ("error", field, None)
        assert answer["error"] == result["error"] and answer["error"].startswith(f"{field}: ")
    outside = worker.run_one({"id": "outside", "mode": "variation", "image": "../outside.png"})
    assert (outside["error_field"], "outside the requests folder" in outside["error"]) == (
        "image",
        True,
    )
    local = {"id": "local", "mode": "variation", "image": str(requests_dir / "reference.png")}
    refused = pyfunc.predict(None, pd.DataFrame([local])).to_dict("records")[0]
    assert refused["error_field"] == "image" and "outside" in refused["error"]


@pytest.mark.filterwarnings("ignore:.*input example was not provided")
def test_the_logged_model_accepts_focus_and_control_through_its_signature(
    package, frozen_bases, pyfunc, requests_dir, tmp_path
):
    signature = request_signature()
    assert signature.inputs.input_names() == list(REQUEST_FIELDS)
    assert signature.outputs.input_names() == list(PYFUNC_RESULT_COLUMNS)
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=QwenFluxPyfunc(),
        artifacts={PACKAGE_ARTIFACT: str(package)},
        signature=signature,
        pip_requirements=["torch"],
        model_config=PYFUNC_MODEL_CONFIG,
    )
    served = mlflow.pyfunc.load_model(
        str(path), model_config={**frozen_bases, "requests": REQUESTS}
    )
    frame = _pyfunc_frame(_batch_rows()[1:], requests_dir)
    answers = served.predict(frame)
    direct = pyfunc.predict(None, frame)
    assert list(answers["status"]) == ["ok", "ok"], answers[["id", "error"]]
    assert list(answers["png"]) == list(direct["png"])


def test_batch_inference_keeps_every_rejected_row_and_duplicate_in_the_results(
    package, requests_dir, make_tiny_config, tiny_models_dir, ray_local, tmp_path
):
    from pipelines.infer import run_inference

    config = make_tiny_config(tmp_path / "run", tiny_models_dir)
    folder = tmp_path / "requests"
    folder.mkdir()
    (folder / "reference.png").write_bytes((requests_dir / "reference.png").read_bytes())
    (folder / "linked.png").symlink_to(requests_dir.parent / "outside.png")
    fast = {"aspect": "32x32", "steps": 2}
    rows = [
        {"id": "dup", "mode": "variation", "image": "reference.png", "seed": 1, **fast},
        {"id": "dup", "mode": "text", "prompt": PROMPT, **fast},
        {"id": "linked-outside", "mode": "variation", "image": "linked.png", **fast},
        {"id": "too-strong", "mode": "text", "prompt": PROMPT, "guidance": 50.0, **fast},
        {"id": "huge-prompt", "mode": "text", "prompt": "red " * 5000, **fast},
        {"id": "dup", "mode": "text", "prompt": "a third", **fast},
    ]
    requests = folder / "requests.jsonl"
    requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fields = {"linked-outside": "image", "too-strong": "guidance", "huge-prompt": "prompt"}
    out = tmp_path / "out"
    for attempt in range(2):  # the rerun reports the duplicates again, never twice
        summary = run_inference(
            config, model=str(package), requests=requests, out_dir=out, show_progress=False
        )
        assert (summary.ok, summary.failed, summary.skipped) == (1 - attempt, 5, attempt)
        assert summary.errors_by_field == {"id": 2, "image": 1, "guidance": 1, "prompt": 1}
        table = pq.read_table(out / "results.parquet").to_pylist()
        assert len(table) == len(rows)
        dups = [row for row in table if row["id"] == "dup"]
        assert [(row["status"], row["error_field"], row["request_row"]) for row in dups] == [
            ("ok", "", 0),
            ("error", "id", 1),
            ("error", "id", 5),
        ]
        assert dups[1]["error"] == "id: duplicate id 'dup' (first at row 0)"
        assert (out / dups[0]["image_path"]).is_file()
        for row in table:
            if row["id"] in fields:
                assert (row["status"], row["error_field"]) == ("error", fields[row["id"]])
                assert row["error"].startswith(f"{fields[row['id']]}: ")
