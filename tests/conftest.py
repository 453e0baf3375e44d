"""Shared pytest fixtures: tiny checkpoints, a local Ray cluster, a tiny encoded dataset."""

import json
from pathlib import Path

from pipelines.environment import apply_quiet_environment

# Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import.
apply_quiet_environment()

import pytest  # noqa: E402

from components.tiny_models import TinyModelPaths, build_tiny_models  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dataset-root",
        default=None,
        help="run the tests/data contract checks on this dataset root (<run>/data)",
    )


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    """Tiny Qwen2-VL + FLUX checkpoints built once per session (seed 0)."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """One in-process Ray cluster for the session (fixed resources, run-local temp folder)."""
    import ray

    from pipelines.ray_session import local_temp_dir

    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=local_temp_dir(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


# The tiny preset trains long enough for the demo's conditioning check (minutes); tests train
# the same three stages for a few steps and check the gate's conditioning check on its own
# (tests/unit/test_conditioning_check.py, and its failing verdict in test_registry_infer.py).
FAST_TRAINING = (
    "train.checkpoint_every_steps=4",
    "train.validate_every_steps=4",
    *(
        f"train.stages.{position}.{key}={value}"
        for position, steps, warmup in ((1, 8, 2), (2, 6, 1), (3, 6, 1))
        for key, value in (("num_steps", steps), ("warmup_steps", warmup), ("decay_steps", 2))
    ),
    "registry.conditioning.modes=[]",
)


def tiny_overrides(root: Path, models: TinyModelPaths, *overrides: str) -> list[str]:
    """The `--set` overrides that point the tiny preset at a test's run folder and the
    session's tiny checkpoints, with FAST_TRAINING (later overrides win)."""
    frozen_bases = [
        f"infer.{key}={path}"
        for key, path in (("controlnet", models.controlnet), ("depth_detector", models.depth))
        if path is not None
    ]
    return [
        f"run.root={root}",
        f"data.sources.2.paths={models.photos}",
        f"data.encode.qwen2vl={models.qwen2vl}",
        f"data.encode.flux={models.flux}",
        *frozen_bases,
        *FAST_TRAINING,
        *overrides,
    ]


def sources_override(*sources: dict) -> str:
    """A `--set` that replaces the preset's [[data.sources]] with `sources` (TOML inline
    tables), e.g. sources_override({"name": "web", "kind": "url_list", "paths": [path]})."""

    def value(item) -> str:
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(part) for part in item) + "]"
        if isinstance(item, str | Path):
            return json.dumps(str(item))
        return repr(item)

    tables = [
        "{" + ", ".join(f"{key} = {value(item)}" for key, item in source.items()) + "}"
        for source in sources
    ]
    return "data.sources=[" + ", ".join(tables) + "]"


def tiny_config(root: Path, models: TinyModelPaths, *overrides: str):
    """The tiny preset with `tiny_overrides`."""
    from pipelines.config import load_config

    return load_config("tiny", tiny_overrides(root, models, *overrides))


@pytest.fixture(scope="session")
def make_tiny_config():
    """`make_tiny_config(root, models, *overrides)`: see `tiny_config`."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_data_run(tmp_path_factory, tiny_models_dir, ray_local):
    """The tiny data pipeline run once per session on the synthetic corpus."""
    from pipelines.data import run_data

    config = tiny_config(
        tmp_path_factory.mktemp("tiny_run"),
        tiny_models_dir,
        "data.synthetic.count=48",
        "data.resources.chunk_size=16",
    )
    summary = run_data(config, show_progress=False)
    return config, summary


@pytest.fixture(scope="session")
def dataset_root(request) -> Path:
    """`--dataset-root` when given, else the tiny run's dataset."""
    given = request.config.getoption("--dataset-root")
    if given:
        return Path(given)
    config, _ = request.getfixturevalue("tiny_data_run")
    return Path(config.run.root) / "data"


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory, tiny_models_dir, tiny_data_run, ray_local):
    """The tiny preset trained once per session by the workflow (`run train`: 2 Ray Train
    workers, three stages) on the tiny dataset: (config, the train step's outputs). Training,
    registry, inference and workflow tests share it."""
    from pipelines.workflow import run_workflow
    from pipelines.workflow_steps import STEPS
    from pipelines.workflow_tracking import WorkflowTracker

    data_config, _ = tiny_data_run
    config = tiny_config(
        tmp_path_factory.mktemp("train_run"),
        tiny_models_dir,
        f"train.dataset={Path(data_config.run.root) / 'data'}",
    )
    record = run_workflow(
        config, target="train", steps=STEPS, tracker=WorkflowTracker(config), report=print
    )
    return config, record["steps"]["train"]["outputs"]


def untrained_generator_parts(models: TinyModelPaths, **extra):
    """GeneratorParts of the untrained tiny model straight from the tiny bases (base FLUX and
    tail, connector seeded 0: components/training/model_loading.py::load_modules), settings from
    the tiny preset; `extra` adds e.g. a ControlNet."""
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from components.inference.generator_parts import GeneratorParts, GeneratorSettings
    from components.training.model_loading import load_modules
    from pipelines.config import load_config

    encode = load_config("tiny", []).data.encode
    bases = replace(encode, qwen2vl=str(models.qwen2vl), flux=str(models.flux))
    modules = load_modules(bases, seed=0)
    vae_config = AutoencoderKL.load_config(models.flux, subfolder="vae")
    return GeneratorParts(
        qwen2vl_path=models.qwen2vl,
        flux_path=models.flux,
        transformer=modules.transformer,
        tail=modules.tail,
        connector=modules.connector,
        settings=GeneratorSettings(
            instruction=encode.instruction,
            image_tokens=encode.image_tokens,
            vae_scaling_factor=vae_config["scaling_factor"],
            vae_shift_factor=vae_config["shift_factor"],
        ),
        **extra,
    )


@pytest.fixture(scope="session")
def make_untrained_parts():
    """`make_untrained_parts(models, **extra)`: see `untrained_generator_parts`."""
    return untrained_generator_parts
