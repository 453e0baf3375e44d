"""train.init_from on the imported tiny release, on the released model's T5 text branch
(train.text_branch = "t5", captions' T5 states cached by data.encode.t5_caption): the training
starts at the imported weights (its loss on the held-out rows is the imported model's, bit for
bit), trains the t5_embedder with the rest, and registers a T5-branch version whose lineage
names the import, which generates from a prompt and exports to the released layout; shards
encoded by another Qwen2-VL prefix, or without T5 states, are refused before anything starts."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from mlflow.tracking import MlflowClient
from release_fixture import build_tiny_release

from components.inference.generator import Generator
from components.inference.package import load_package
from components.inference.release_package import export_release, import_release
from components.inference.request_schema import GenerationRequest
from components.training.loop import LoopData
from components.training.model_loading import latent_convention, load_training_model
from components.training.objective import (
    ObjectiveConfig,
    QwenFluxModel,
    step_conditioning,
    validation_losses,
)
from pipelines.config import load_config
from pipelines.data import run_data
from pipelines.init_from import InitFromMismatchError
from pipelines.register import gate_inputs, run_registration
from pipelines.train import DatasetModelMismatchError, run_training
from pipelines.train_tracking import tracking_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def from_release(tmp_path_factory, tiny_models_dir, ray_local):
    """(config training from the imported release, its package, the release folder): data
    encoded with the release's own Qwen2-VL."""
    root = tmp_path_factory.mktemp("init_from")
    source = build_tiny_release(root / "release", tiny_models_dir)
    package = import_release(source, root / "imported")
    config = tiny_config(
        root / "run",
        tiny_models_dir,
        "data.synthetic.count=32",
        "data.resources.chunk_size=16",
        f"data.encode.qwen2vl={source / 'qwen2-vl'}",
        f"train.init_from={package}",
        "train.text_branch=t5",
        "data.encode.t5_caption=true",
        "registry.min_improvement=0.0",
    )
    run_data(config, show_progress=False)
    return config, package, source


def _held_out_losses(model, config) -> dict[float, float]:
    """Losses at the fixed sigmas on the rows training holds out (the gate's batch)."""
    inputs = gate_inputs(config)
    convention = latent_convention(config.data.encode, dataset_root=inputs.dataset_root)
    batch = LoopData.from_dataset(
        inputs.dataset_root, num_validation_samples=inputs.num_validation_samples, device="cpu"
    ).validation_batch
    return validation_losses(model.eval(), batch, objective=inputs.objective, convention=convention)


def test_the_training_starts_at_the_imported_weights(from_release):
    config, package, _ = from_release
    root = Path(config.run.root) / "data"
    start, _ = load_training_model(
        config.data.encode, dataset_root=root, seed=config.run.seed, init_from=package
    )
    parts = load_package(package)
    imported = QwenFluxModel(parts.tail, parts.connector, parts.transformer).to(torch.float32)
    assert _held_out_losses(start, config) == _held_out_losses(imported, config)
    bases, _ = load_training_model(config.data.encode, dataset_root=root, seed=config.run.seed)
    assert _held_out_losses(bases, config) != _held_out_losses(start, config)


def test_training_from_the_import_registers_a_version_naming_it(from_release, tmp_path):
    config, package, source = from_release
    run_training(config)
    result = run_registration(config)
    assert result.version is not None, result.gate.message()
    imported = load_package(package)
    start = QwenFluxModel(imported.tail, imported.connector, imported.transformer).float()
    losses = _held_out_losses(start, config)
    # The gate's "untrained start" is the imported model on the same held-out rows.
    assert result.gate.base_validation_loss == pytest.approx(sum(losses.values()) / len(losses))
    version = MlflowClient(tracking_uri(config)).get_model_version(
        config.registry.model_name, result.version
    )
    assert version.tags["init_from"] == str(package)
    assert version.tags["init_from_imported"] == str(source.absolute())
    # The T5 embedder trained from the released one; the fine-tune reads prompts through it.
    tuned = load_package(result.package_dir)
    assert tuned.settings.text_branch == "t5"
    assert not torch.equal(tuned.t5_embedder.weight, imported.t5_embedder.weight.float())
    image = Generator(tuned).generate(
        GenerationRequest(mode="text", prompt="a red square", width=32, height=32, steps=2)
    )
    assert image.size == (32, 32)
    exported = export_release(result.package_dir, tmp_path / "exported")
    released = torch.load(exported / "qwen2-vl" / "t5_embedder.pt", weights_only=True)
    assert torch.equal(released["weight"].float(), tuned.t5_embedder.weight.float())


def test_shards_from_another_prefix_are_refused(from_release, tiny_data_run):
    _, package, _ = from_release
    data_config, _ = tiny_data_run  # encoded by the tiny base Qwen2-VL (fp32), not the release's
    config = load_config(
        "tiny",
        [
            f"run.root={data_config.run.root}",
            f"data.encode.qwen2vl={data_config.data.encode.qwen2vl}",
            f"data.encode.flux={data_config.data.encode.flux}",
            f"train.init_from={package}",
        ],
    )
    with pytest.raises(InitFromMismatchError, match="was trained on the Qwen2-VL prefix of"):
        run_training(config)


def test_each_sample_reads_its_caption_through_t5_after_the_image_tokens(from_release):
    """On the T5 branch a sample conditioned on its caption attends all 256 T5 tokens (after the
    connector's image tokens, or alone), one that is not attends none; CLIP gets the empty
    prompt's vector."""
    config, package, _ = from_release
    root = Path(config.run.root) / "data"
    model, convention = load_training_model(
        config.data.encode,
        dataset_root=root,
        seed=config.run.seed,
        init_from=package,
        text_branch="t5",
    )
    batch = LoopData.from_dataset(root, num_validation_samples=2, device="cpu").validation_batch
    expected = {"image": (True, False), "caption": (False, True), "both": (True, True)}
    for share, (image_part, caption_part) in expected.items():
        objective = ObjectiveConfig(
            image_only_probability=float(share == "image"),
            caption_only_probability=float(share == "caption"),
            image_and_caption_probability=float(share == "both"),
            drop_rate=0.0,
        )
        with torch.no_grad():
            chosen = step_conditioning(
                model,
                batch,
                objective=objective,
                convention=convention,
                generator=torch.Generator().manual_seed(0),
            )
        assert chosen.mask_BT.any(dim=1).tolist() == [image_part] * 2, share
        assert chosen.embedded_mask_BU.shape == (2, 256)
        assert chosen.embedded_mask_BU.all(dim=1).tolist() == [caption_part] * 2, share
        assert chosen.embedded_mask_BU.any(dim=1).tolist() == [caption_part] * 2, share
        assert torch.equal(chosen.pooled_BP, convention.empty_pooled_P.expand(2, -1))
        with torch.no_grad():
            states = model.t5_embedder(batch["caption_t5_hidden"])
        assert torch.equal(chosen.embedded_BUE, states)


def test_the_t5_branch_needs_t5_caption_states(tiny_data_run):
    data_config, _ = tiny_data_run  # encoded without data.encode.t5_caption
    config = load_config(
        "tiny",
        [
            f"run.root={data_config.run.root}",
            f"data.encode.qwen2vl={data_config.data.encode.qwen2vl}",
            f"data.encode.flux={data_config.data.encode.flux}",
            "train.text_branch=t5",
        ],
    )
    with pytest.raises(DatasetModelMismatchError, match="encode it with data.encode.t5_caption"):
        run_training(config)
