"""The three-stage fine-tune end to end on tiny models: Ray Train (2 workers) over the tiny
dataset, MLflow parent + stage runs with metrics, validation, grids and checkpoints."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.training.distributed_checkpoint import checkpoint_weights
from model.flux_stages import STAGE_BLOCKS
from pipelines.train_tracking import tracking_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    return tiny_trained_run


def test_three_stages_train_and_the_loss_falls(trained):
    config, training = trained
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "training" in run.data.tags]
    stages = {run.data.tags["stage"]: run for run in runs if "stage" in run.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == training["training_run_id"]
    # The training nests under the workflow's train step, which nests under the workflow run.
    step = client.get_run(parents[0].data.tags["mlflow.parentRunId"])
    assert step.data.tags["workflow_step"] == "train"
    assert client.get_run(step.data.tags["mlflow.parentRunId"]).data.tags["workflow_target"] == (
        "train"
    )
    # The tiny preset mixes two sources of weight 1: each gets half the steps.
    params = parents[0].data.params
    assert (params["source_share.web"], params["source_share.photos"]) == ("0.5", "0.5")
    assert set(stages) == {"stage1", "stage2", "stage3"}
    assert {run.info.status for run in stages.values()} == {"FINISHED"}
    for stage in config.train.stages:
        history = client.get_metric_history(stages[stage.name].info.run_id, "loss")
        assert [metric.step for metric in history] == list(range(stage.num_steps))
        for key in ("learning_rate", "grad_norm", "samples_per_second", "peak_memory_mb"):
            assert client.get_metric_history(stages[stage.name].info.run_id, key)
        grids = client.list_artifacts(stages[stage.name].info.run_id, "grids")
        assert grids and all(item.path.endswith(".png") for item in grids)
    first = client.get_metric_history(stages["stage1"].info.run_id, "validation_loss")[0].value
    last = client.get_metric_history(stages["stage3"].info.run_id, "validation_loss")[-1].value
    print(f"held-out validation loss: {first:.4f} -> {last:.4f} ({1 - last / first:.1%} lower)")
    assert last < 0.97 * first
    stored = client.list_artifacts(parents[0].info.run_id, "checkpoints")
    assert {Path(item.path).name for item in stored} == {"stage1", "stage2", "stage3"}


def test_final_checkpoint_holds_every_trained_part(trained):
    _, training = trained
    weights = checkpoint_weights(Path(training["checkpoint"]))
    blocks = set()
    for name in weights:
        if name.startswith("transformer.transformer_blocks."):
            blocks.add(int(name.split(".")[2]))
        elif name.startswith("transformer.single_transformer_blocks."):
            blocks.add(19 + int(name.split(".")[2]))
    assert blocks == set().union(*STAGE_BLOCKS.values())
    assert any(name.startswith("tail.layer.") for name in weights)
    assert {"connector.weight", "connector.bias"} <= set(weights)
