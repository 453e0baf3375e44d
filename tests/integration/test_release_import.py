"""The released checkpoint's layout: a tiny release built in exactly that shape is imported as a
package, exported back to the layout and imported again with bit-identical tensors; the export
loads the way the authors' code loads it; pickles are read weights-only into checked keys, and
one crafted to run code on load is refused without running it."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from release_fixture import build_tiny_release
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Qwen2VLForConditionalGeneration

from components.inference import release
from components.inference.package import load_package, read_manifest
from components.inference.release_package import export_release, import_release

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_models_dir):
    """(release folder, its package, the package's export, the export's package)."""
    root = tmp_path_factory.mktemp("release")
    source = build_tiny_release(root / "release", tiny_models_dir)
    first = import_release(source, root / "packages" / "first")
    exported = export_release(first, root / "exported")
    second = import_release(exported, root / "packages" / "second")
    return source, first, exported, second


def _package_tensors(package: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(package.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            tensors[f"{path.relative_to(package).parent}/{path.stem}:{key}"] = value
    return tensors


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        assert value.dtype == second[key].dtype and torch.equal(value, second[key]), key


def test_import_export_import_gives_bit_identical_tensors(imported):
    source, first, exported, second = imported
    one, two = _package_tensors(first), _package_tensors(second)
    _same(one, two)
    # The transformer's files are the release's own bytes.
    for path in (source / "flux" / "transformer").iterdir():
        assert (first / "transformer" / path.name).read_bytes() == path.read_bytes()
    # The tail is the release Qwen2-VL's last layer and final norm, in the release's bf16.
    tail = load_file(str(first / "encoder_tail.safetensors"))
    with open(source / "qwen2-vl" / "model.safetensors.index.json") as handle:
        weight_map = json.load(handle)["weight_map"]
    for key, value in tail.items():
        name = f"model.layers.1.{key[6:]}" if key.startswith("layer.") else f"model.{key}"
        with safe_open(str(source / "qwen2-vl" / weight_map[name]), "pt") as shard:
            assert torch.equal(shard.get_tensor(name), value), key
    assert {value.dtype for value in one.values()} == {torch.bfloat16}
    manifest = read_manifest(first)
    assert manifest["format"] == 2 and manifest["settings"]["text_branch"] == "t5"
    assert manifest["settings"]["prompt_image_tokens"] == 256
    assert manifest["settings"]["image_tokens"] == 512
    files = manifest["import"]["files"]
    assert "qwen2-vl/connector.pt" in files and "qwen2-vl/t5_embedder.pt" in files
    assert any(name.startswith("flux/transformer/") for name in files)
    assert manifest["import"]["controlnet"] == str((source / "controlnet").absolute())


def test_the_export_has_the_released_file_and_key_names(imported):
    source, _, exported, _ = imported
    released = {path.relative_to(source).as_posix() for path in source.rglob("*") if path.is_file()}
    ours = {path.relative_to(exported).as_posix() for path in exported.rglob("*") if path.is_file()}
    # Every released file is there under its name (the optional controlnet/ is not exported).
    assert {name for name in released if not name.startswith("controlnet/")} == ours
    connector = torch.load(exported / "qwen2-vl" / "connector.pt", weights_only=True)
    assert sorted(connector) == ["linear.bias", "linear.weight"]
    t5 = torch.load(exported / "qwen2-vl" / "t5_embedder.pt", weights_only=True)
    assert sorted(t5) == ["bias", "weight"]
    index = json.loads((exported / "qwen2-vl" / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert not any(name.startswith("lm_head.") for name in names)
    assert names == set(
        json.loads((source / "qwen2-vl" / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert {name.split(".")[0] for name in names} == {"visual", "model"}


def test_the_authors_way_of_loading_the_export_gets_the_same_tensors(imported):
    _, first, exported, _ = imported
    # connector.pt and t5_embedder.pt: torch.load(weights_only=True), "module." stripped,
    # into plain Linear layers of the widths the code hard-codes (tiny widths here).
    connector_state = torch.load(exported / "qwen2-vl" / "connector.pt", weights_only=True)
    connector_state = {key.replace("module.", ""): value for key, value in connector_state.items()}
    weight = connector_state["linear.weight"]
    connector = torch.nn.Module()
    connector.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    connector.load_state_dict(connector_state)
    ours = load_file(str(first / "connector.safetensors"))
    assert torch.equal(connector.linear.weight.to(torch.bfloat16), ours["weight"])
    t5_state = torch.load(exported / "qwen2-vl" / "t5_embedder.pt", weights_only=True)
    embedder = torch.nn.Linear(t5_state["weight"].shape[1], t5_state["weight"].shape[0])
    embedder.load_state_dict(t5_state)
    assert torch.equal(
        embedder.bias.to(torch.bfloat16), load_file(str(first / "t5_embedder.safetensors"))["bias"]
    )
    transformer = FluxTransformer2DModel.from_pretrained(exported / "flux", subfolder="transformer")
    package_transformer = FluxTransformer2DModel.from_pretrained(first / "transformer")
    for (name, value), (other, expected) in zip(
        transformer.state_dict().items(), package_transformer.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(value, expected), name
    qwen, info = Qwen2VLForConditionalGeneration.from_pretrained(
        exported / "qwen2-vl", output_loading_info=True
    )
    assert info["missing_keys"] == {"lm_head.weight"} or set(info["missing_keys"]) == {
        "lm_head.weight"
    }
    assert not info["unexpected_keys"]
    tail = load_file(str(first / "encoder_tail.safetensors"))
    last = qwen.model.language_model.layers[-1]
    for key, value in last.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), tail[f"layer.{key}"]), key


def test_the_imported_package_loads_with_its_t5_embedder(imported):
    _, first, _, _ = imported
    parts = load_package(first)
    assert parts.settings.text_branch == "t5"
    assert parts.t5_embedder is not None and parts.t5_embedder.in_features == 32
    assert parts.t5_embedder.out_features == 64


class _Payload:
    """Unpickling this calls Path.touch on the marker: code run by merely loading the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, tiny_models_dir):
    source = build_tiny_release(tmp_path / "release", tiny_models_dir)
    marker = tmp_path / "code-ran"
    connector = source / "qwen2-vl" / "connector.pt"
    state = torch.load(connector, weights_only=True)
    torch.save({**state, "module.linear.extra": _Payload(marker)}, connector)
    with pytest.raises(release.ReleaseError, match=r"connector\.pt: refused: not a weights-only"):
        import_release(source, tmp_path / "package")
    assert not marker.exists() and not (tmp_path / "package").exists()
    # The file does run code when loaded without weights_only: the refusal is what stopped it.
    loaded = torch.load(connector, weights_only=False)
    assert marker.exists() and loaded["module.linear.extra"] is None


def test_a_missing_connector_or_a_misshapen_pickle_is_an_error(tmp_path, tiny_models_dir):
    source = build_tiny_release(tmp_path / "release", tiny_models_dir)
    t5 = source / "qwen2-vl" / "t5_embedder.pt"
    state = torch.load(t5, weights_only=True)
    torch.save({"weight": state["weight"][:, :4], "bias": state["bias"]}, t5)
    with pytest.raises(release.ReleaseError, match=r"t5_embedder\.pt: refused: 'weight' is"):
        import_release(source, tmp_path / "package")
    torch.save({"weight": state["weight"], "bias": state["bias"], "extra": state["bias"]}, t5)
    with pytest.raises(release.ReleaseError, match=r"unexpected \['extra'\]"):
        import_release(source, tmp_path / "package")
    (source / "qwen2-vl" / "connector.pt").unlink()
    with pytest.raises(release.ReleaseError, match=r"connector\.pt is missing"):
        import_release(source, tmp_path / "package")
    assert not (tmp_path / "package").exists()


def test_pickles_beside_flux_at_the_top_are_read_too(tmp_path, tiny_models_dir):
    source = build_tiny_release(tmp_path / "release", tiny_models_dir, pickles_at_top=True)
    package = import_release(source, tmp_path / "package")
    files = read_manifest(package)["import"]["files"]
    assert "connector.pt" in files and "t5_embedder.pt" in files
