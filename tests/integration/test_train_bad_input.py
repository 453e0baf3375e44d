"""Bad input to training fails before anything starts, with an error naming the culprit, and
leaves nothing half-written (no run folder, no MLflow run)."""

import json
import shutil
from pathlib import Path

import pytest

from components.checkpoints import CheckpointNotFoundError
from components.data.shard_format import ShardFormatError
from components.training.loader import LoaderError
from pipelines.run_layout import RunLayout
from pipelines.train import DatasetModelMismatchError, run_training

pytestmark = pytest.mark.integration


@pytest.fixture
def dataset_copy(tiny_data_run, tmp_path):
    data_config, _ = tiny_data_run
    copy = tmp_path / "data"
    shutil.copytree(Path(data_config.run.root) / "data", copy)
    return copy


def _config(make_tiny_config, tmp_path, models, dataset, *overrides):
    return make_tiny_config(tmp_path / "run", models, f"train.dataset={dataset}", *overrides)


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "run").exists()


def test_unknown_checkpoint_path_is_named(
    make_tiny_config, tiny_models_dir, dataset_copy, tmp_path
):
    config = _config(
        make_tiny_config,
        tmp_path,
        tiny_models_dir,
        dataset_copy,
        f"data.encode.flux={tmp_path / 'no-such-flux'}",
    )
    with pytest.raises(CheckpointNotFoundError, match="no-such-flux"):
        run_training(config)
    _assert_nothing_written(tmp_path)


def test_missing_and_corrupt_shards_are_named(
    make_tiny_config, tiny_models_dir, dataset_copy, tmp_path
):
    config = _config(make_tiny_config, tmp_path, tiny_models_dir, dataset_copy)
    shard = sorted(dataset_copy.glob("shards/bucket=*/part-*.parquet"))[0]
    shard.write_bytes(b"PAR1 not really")
    with pytest.raises((LoaderError, ShardFormatError), match=shard.name):
        run_training(config)
    shard.unlink()
    with pytest.raises(LoaderError, match=shard.name):
        run_training(config)
    (dataset_copy / "manifest.json").write_text("{")
    with pytest.raises(ShardFormatError, match="manifest"):
        run_training(config)
    _assert_nothing_written(tmp_path)


def test_data_encoded_by_another_qwen_is_refused(
    make_tiny_config, tiny_models_dir, dataset_copy, tmp_path
):
    # Another checkpoint: a local checkpoint's identity is the sha256 of its config.json.
    other = tmp_path / "other-qwen2-vl"
    shutil.copytree(tiny_models_dir.qwen2vl, other)
    config_json = json.loads((other / "config.json").read_text())
    config_json["text_config"]["rms_norm_eps"] = 2e-6
    (other / "config.json").write_text(json.dumps(config_json))
    config = _config(
        make_tiny_config, tmp_path, tiny_models_dir, dataset_copy, f"data.encode.qwen2vl={other}"
    )
    with pytest.raises(DatasetModelMismatchError, match="re-encode"):
        run_training(config)
    _assert_nothing_written(tmp_path)


def test_checkpoints_of_an_older_format_are_refused_before_any_worker_starts(
    make_tiny_config, tiny_models_dir, dataset_copy, tmp_path
):
    storage = tmp_path / "storage"
    config = _config(
        make_tiny_config, tmp_path, tiny_models_dir, dataset_copy, f"train.storage_path={storage}"
    )
    training = RunLayout(config).current_training_name()
    old = storage / training / "checkpoint_2026-01-01_00-00-00.000000"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"stage_index": 0, "next_step": 2}))
    with pytest.raises(ValueError, match=f"{old.name} has format None"):
        run_training(config)
    _assert_nothing_written(tmp_path)
