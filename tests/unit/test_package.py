"""Model package: export from a training checkpoint, load back bit-exact, verify the frozen bases,
and fail clearly (and atomically) on bad checkpoints, packages and bases."""

import dataclasses
import json
import shutil
from pathlib import Path

import checkpoint_files
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from components import checkpoints
from components.checkpoints import CheckpointNotFoundError
from components.inference import package as package_module
from components.inference.generator_parts import GeneratorSettings
from components.inference.package import (
    PackageError,
    PackageIntegrityError,
    export_package,
    load_package,
)
from components.tiny_models import TinyModelPaths
from components.training.encoder_tail import load_qwen2vl_tail
from components.training.objective import QwenFluxModel
from model.conditioning import Connector

pytestmark = pytest.mark.unit

SETTINGS = GeneratorSettings(
    instruction="Describe this image.",
    image_tokens=16,
    vae_scaling_factor=0.3611,
    vae_shift_factor=0.1159,
    guidance=3.5,
)
LINEAGE = {"training_run_id": "run-1", "git_sha": "abc123"}
_real_hash = checkpoints.hash_file
TRAINED_PREFIXES = (
    "transformer.transformer_blocks.0.",
    "transformer.single_transformer_blocks.1.",
    "tail.",
    "connector.",
)


def perturbed_model(bases: TinyModelPaths, *, seed: int) -> QwenFluxModel:
    """The model training would start from, with its trained groups moved by seeded noise."""
    transformer = FluxTransformer2DModel.from_pretrained(bases.flux, subfolder="transformer")
    tail = load_qwen2vl_tail(str(bases.qwen2vl))
    torch.manual_seed(seed)
    connector = Connector(tail.norm.weight.shape[0], transformer.config.joint_attention_dim)
    model = QwenFluxModel(tail, connector, transformer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(TRAINED_PREFIXES):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def write_checkpoint(model: QwenFluxModel, folder: Path, *, skip: str = "") -> Path:
    """A training checkpoint folder (components/training/checkpoint_state.py layout) of the
    trained groups."""
    weights = {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if name.startswith(TRAINED_PREFIXES) and not (skip and name.startswith(skip))
    }
    return checkpoint_files.write_checkpoint(folder, weights)


def copy_bases(source: TinyModelPaths, dst: Path) -> TinyModelPaths:
    shutil.copytree(source.root, dst)
    return TinyModelPaths(root=dst, qwen2vl=dst / source.qwen2vl.name, flux=dst / source.flux.name)


def export(bases: TinyModelPaths, checkpoint: Path, out_dir: Path, **overrides) -> Path:
    arguments = dict(
        checkpoint_dir=checkpoint,
        qwen2vl=str(bases.qwen2vl),
        qwen2vl_revision=None,
        flux=str(bases.flux),
        flux_revision=None,
        settings=SETTINGS,
        lineage=LINEAGE,
        out_dir=out_dir,
    )
    return export_package(**(arguments | overrides))


@pytest.fixture(scope="module")
def bases(tiny_models_dir, tmp_path_factory) -> TinyModelPaths:
    """A private copy of the tiny bases (tests here change and delete base files)."""
    return copy_bases(tiny_models_dir, tmp_path_factory.mktemp("bases") / "models")


@pytest.fixture(scope="module")
def exported(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    model = perturbed_model(bases, seed=1)
    checkpoint = write_checkpoint(model, root / "checkpoint")
    return model, checkpoint, export(bases, checkpoint, root / "packages" / "pkg")


def _assert_same_state(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(loaded_state[key], value), key


def test_loaded_package_holds_exactly_the_checkpointed_networks(exported, bases):
    model, _, package = exported
    parts = load_package(package, name="flux-qwen2vl", version="3")
    _assert_same_state(parts.transformer, model.transformer)
    _assert_same_state(parts.tail, model.tail)
    _assert_same_state(parts.connector, model.connector)
    assert parts.settings == SETTINGS
    assert (parts.name, parts.version) == ("flux-qwen2vl", "3")
    assert (parts.qwen2vl_path, parts.flux_path) == (bases.qwen2vl, bases.flux)
    assert not any(p.requires_grad for p in parts.transformer.parameters())
    hidden = torch.randn(1, 5, model.tail.norm.weight.shape[0])
    positions = torch.arange(5).expand(3, 1, 5)
    mask = torch.ones(1, 5, dtype=torch.int64)
    with torch.no_grad():
        assert torch.equal(
            parts.tail(hidden, positions, mask), model.tail.eval()(hidden, positions, mask)
        )


def test_exported_transformer_loads_with_plain_diffusers_and_predicts_the_same(exported):
    _, _, package = exported
    plain = FluxTransformer2DModel.from_pretrained(package / "transformer").eval()
    assert list((package / "transformer").glob("*.bin")) == []
    packaged = load_package(package).transformer
    config = plain.config
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 16, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=torch.randint(0, 4, (16, 3)).float(),
        txt_ids=torch.zeros(7, 3),
        guidance=torch.tensor([3.5, 3.5]),
        return_dict=False,
    )
    with torch.no_grad():
        assert torch.equal(plain(**inputs)[0], packaged(**inputs)[0])


def test_manifest_records_settings_lineage_and_hashes_of_the_files_the_generator_reads(exported):
    _, _, package = exported
    manifest = json.loads((package / "package.json").read_text())
    assert manifest["format"] == package_module.PACKAGE_FORMAT
    assert manifest["settings"]["image_tokens"] == SETTINGS.image_tokens
    assert manifest["lineage"] == LINEAGE
    assert manifest["connector"] == {"in_features": 16, "out_features": 32}
    assert manifest["checkpoint"]["stage_index"] == 2
    qwen, flux = manifest["bases"]["qwen2vl"], manifest["bases"]["flux"]
    assert qwen["revision_id"].startswith("local:")
    qwen_files = set(qwen["files"])
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= qwen_files
    assert {"chat_template.json", "preprocessor_config.json"} <= qwen_files
    assert {f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)} <= qwen_files
    flux_folders = {name.split("/")[0] for name in flux["files"]}
    assert flux_folders == {"model_index.json", "vae", "text_encoder", "tokenizer"}
    assert all(len(sha) == 64 for sha in {**qwen["files"], **flux["files"]}.values())


def test_bfloat16_package_loads_as_stored(exported, bases, tmp_path):
    _, checkpoint, _ = exported
    package = export(bases, checkpoint, tmp_path / "bf16", dtype="bfloat16")
    parts = load_package(package)
    assert parts.transformer.dtype == torch.bfloat16
    assert parts.connector.weight.dtype == torch.bfloat16
    assert parts.tail.rotary_emb.inv_freq.dtype == torch.float32


@pytest.fixture
def own_package(tiny_models_dir, exported, tmp_path):
    """A package exported against bases this test alone may change."""
    bases = copy_bases(tiny_models_dir, tmp_path / "models")
    return bases, export(bases, exported[1], tmp_path / "packages" / "pkg")


def test_changed_base_file_is_a_hash_mismatch_naming_it(own_package, monkeypatch):
    bases, package = own_package
    load_package(package)  # warms the hash cache
    hashed = []
    monkeypatch.setattr(
        checkpoints, "hash_file", lambda path: hashed.append(path) or _real_hash(path)
    )
    load_package(package)
    assert hashed == [], "unchanged bases were re-hashed despite the cache"
    changed = bases.flux / "vae" / "config.json"
    recorded = _real_hash(changed)
    changed.write_text(changed.read_text() + " ")
    with pytest.raises(PackageIntegrityError) as error:
        load_package(package)
    message = str(error.value)
    assert str(changed) in message and recorded in message
    assert _real_hash(changed) in message
    assert hashed == [changed]


def test_missing_base_file_and_missing_base_are_clear_errors(own_package):
    bases, package = own_package
    (bases.qwen2vl / "tokenizer.json").unlink()
    with pytest.raises(PackageIntegrityError, match="tokenizer.json is missing"):
        load_package(package)
    shutil.rmtree(bases.qwen2vl)
    with pytest.raises(CheckpointNotFoundError, match=f"base qwen2vl '{bases.qwen2vl}'"):
        load_package(package)


def test_corrupt_or_unknown_package_json_is_a_clear_error(exported, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(exported[2], package)
    manifest = package / "package.json"
    good = json.loads(manifest.read_text())
    manifest.write_text('{"format": 1, "settings": ')
    with pytest.raises(PackageError, match="corrupt package.json"):
        load_package(package)
    manifest.write_text(json.dumps(good | {"format": 99}))
    with pytest.raises(PackageError, match="format 99"):
        load_package(package)
    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "bases"}))
    with pytest.raises(PackageError, match="invalid.*bases"):
        load_package(package)
    manifest.write_text(json.dumps(good))
    (package / "connector.safetensors").unlink()
    with pytest.raises(PackageError, match="lacks connector.safetensors"):
        load_package(package)


def _assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir()] if out_dir.parent.exists() else []
    assert not [name for name in leftovers if ".partial-" in name], leftovers


def test_checkpoint_without_connector_fails_and_writes_nothing(exported, bases, tmp_path):
    checkpoint = write_checkpoint(exported[0], tmp_path / "checkpoint", skip="connector.")
    out_dir = tmp_path / "packages" / "pkg"
    with pytest.raises(PackageError, match="lacks the connector.*connector.bias"):
        export(bases, checkpoint, out_dir)
    _assert_nothing_written(out_dir)


def test_unknown_or_misshapen_checkpoint_tensor_is_named(bases, tmp_path):
    connector = {"connector.weight": torch.zeros(32, 16), "connector.bias": torch.zeros(32)}
    unknown = connector | {"transformer.not_a_param": torch.zeros(1)}
    folder = checkpoint_files.write_checkpoint(tmp_path / "unknown", unknown)
    with pytest.raises(PackageError, match=r"unknown: tensor 'transformer.not_a_para"):
        export(bases, folder, tmp_path / "a")
    misshapen = connector | {"tail.norm.weight": torch.zeros(3)}
    folder = checkpoint_files.write_checkpoint(tmp_path / "misshapen", misshapen)
    with pytest.raises(PackageError, match=r"'tail.norm.weight' has shape \(3,\)"):
        export(bases, folder, tmp_path / "b")
    _assert_nothing_written(tmp_path / "b")


def test_a_format_2_checkpoint_still_exports_and_ema_is_chosen_by_name(exported, bases, tmp_path):
    """Checkpoints written before DCP (full tensors in safetensors) export to the same package;
    a checkpoint with EMA shadows exports them on request, one without refuses by name."""
    model = exported[0]
    weights = {
        name: param.detach()
        for name, param in model.named_parameters()
        if name.startswith(TRAINED_PREFIXES)
    }
    legacy = checkpoint_files.write_legacy_checkpoint(tmp_path / "legacy", weights)
    package = export(bases, legacy, tmp_path / "pkg_legacy")
    current = package_module.load_file(str(exported[2] / package_module.CONNECTOR_FILE))
    stored = package_module.load_file(str(package / package_module.CONNECTOR_FILE))
    assert all(torch.equal(stored[key], current[key]) for key in current)
    with pytest.raises(ValueError, match="format 2.*no EMA"):
        export(bases, legacy, tmp_path / "pkg_legacy_ema", weights="ema")
    shadows = {name: value + 1.0 for name, value in weights.items()}
    with_ema = checkpoint_files.write_checkpoint(tmp_path / "ema", weights, ema=shadows)
    package = export(bases, with_ema, tmp_path / "pkg_ema", weights="ema")
    stored = package_module.load_file(str(package / package_module.CONNECTOR_FILE))
    assert torch.equal(stored["weight"], shadows["connector.weight"])
    assert json.loads((package / "package.json").read_text())["checkpoint"]["weights"] == "ema"
    with pytest.raises(ValueError, match="holds no EMA"):
        export(bases, exported[1], tmp_path / "pkg_no_ema", weights="ema")


def test_failure_while_writing_leaves_nothing_behind(exported, bases, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(package_module, "save_file", broken_save)
    out_dir = tmp_path / "packages" / "pkg"
    with pytest.raises(OSError, match="disk full"):
        export(bases, exported[1], out_dir)
    _assert_nothing_written(out_dir)
    with pytest.raises(FileExistsError):
        export(bases, exported[1], exported[2])


def _t5_linear(bases: TinyModelPaths, seed: int) -> torch.nn.Linear:
    """A Linear(tiny T5 width -> tiny FLUX inner width) with seeded weights."""
    t5_width = json.loads((bases.flux / "text_encoder_2" / "config.json").read_text())["d_model"]
    config = json.loads((bases.flux / "transformer" / "config.json").read_text())
    torch.manual_seed(seed)
    return torch.nn.Linear(t5_width, config["num_attention_heads"] * config["attention_head_dim"])


def test_the_t5_embedder_comes_from_the_checkpoint_or_rides_along(exported, bases, tmp_path):
    """A T5-branch training checkpoint holds its trained t5_embedder and the package stores it;
    a Qwen2-VL-branch one started from a release carries the given file; a T5-branch package
    without any is refused, writing nothing."""
    model, checkpoint, _ = exported
    trained = _t5_linear(bases, seed=5)
    state = {name: param.detach().contiguous() for name, param in model.named_parameters()}
    kept = {name: state[name] for name in state if name.startswith(TRAINED_PREFIXES)}
    embedder = {f"t5_embedder.{k}": v for k, v in trained.state_dict().items()}
    folder = checkpoint_files.write_checkpoint(tmp_path / "t5_checkpoint", kept | embedder)
    t5_settings = dataclasses.replace(SETTINGS, text_branch="t5")
    package = export(bases, folder, tmp_path / "pkg_t5", settings=t5_settings)
    parts = load_package(package)
    assert torch.equal(parts.t5_embedder.weight, trained.weight)
    recorded = json.loads((package / "package.json").read_text())["bases"]["flux"]["files"]
    assert any(path.startswith("text_encoder_2/") for path in recorded)

    carried_file = tmp_path / "carried.safetensors"
    carried = _t5_linear(bases, seed=6)
    save_file({k: v.contiguous() for k, v in carried.state_dict().items()}, str(carried_file))
    package = export(bases, checkpoint, tmp_path / "pkg_carried", t5_embedder=carried_file)
    stored = package_module.load_file(str(package / package_module.T5_EMBEDDER_FILE))
    assert torch.equal(stored["weight"], carried.weight)

    with pytest.raises(PackageError, match="text_branch 't5' needs a t5_embedder"):
        export(bases, checkpoint, tmp_path / "pkg_none", settings=t5_settings)
    _assert_nothing_written(tmp_path / "pkg_none")
