"""MLflow Model Registry around the model package (components/inference/package.py).

register_model logs a package folder as a pyfunc model (the package is its `package` artifact)
into a given training run, registers it as a new version with lineage and gate tags and points
the `candidate` alias at it; promote moves `champion` to a candidate whose gate metric beats the
champion's; resolve_package / load_parts bring a `models:/NAME@ALIAS` or `models:/NAME/VERSION`
back to a local, verified package. Every call takes its tracking URI explicitly and never
starts or leaves an active run.

The pyfunc flavour (QwenFluxPyfunc) is for MLflow-native serving: request rows (the schema of
batch inference, components/inference/request_schema.py) -> result rows with PNG bytes.
Our own batch inference loads the package through load_parts: only safetensors and JSON, while
mlflow.pyfunc.load_model unpickles MLflow's python_model.pkl (a reference to this class).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

from components.inference.generator_parts import GeneratorParts
from components.inference.package import PACKAGE_FILE, load_package, read_manifest
from components.inference.request_rows import (
    RESULT_COLUMNS,
    generate_row,
    png_bytes,
    request_id,
)
from components.inference.request_schema import REQUEST_FIELDS, defaults_from_plain

MODEL_ARTIFACT_NAME = "qwenflux"
"""Name of the logged pyfunc model inside the run."""
PACKAGE_ARTIFACT = "package"
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
GATE_TAG_PREFIX = "gate."
DOWNLOAD_MARKER = ".registry_download.json"
"""Written into a downloaded package just before it is moved into place: it is complete."""
PYFUNC_RESULT_COLUMNS = (*RESULT_COLUMNS, "png")
"""The pyfunc's result rows: request_rows.RESULT_COLUMNS + png (PNG bytes; None unless ok)."""
PYFUNC_MODEL_CONFIG = {"controlnet": "", "depth_detector": "", "requests": {}}
"""The pyfunc's model_config as logged (no ControlNet, RequestDefaults' defaults); a server sets
its own with mlflow.pyfunc.load_model(uri, model_config={...}) (see QwenFluxPyfunc)."""
_REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "pillow", "pandas", "mlflow")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class RegistryError(LookupError):
    """An unknown registered model, alias or version, or a version lacking what we need."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PromotionDecision:
    """What promote decided and the gate values it compared (lower is better)."""

    promoted: bool
    metric: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None
    """The champion before this decision; None when there was none."""
    champion_value: float | None
    message: str


class QwenFluxPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: request rows (REQUEST_FIELDS, images as encoded bytes) -> result rows
    (PYFUNC_RESULT_COLUMNS), through request_rows.generate_row: the parser, limits and checks of
    batch inference, with the package's Generator (CUDA + bf16 when a GPU is visible, else CPU
    + fp32). A bad row gets status "error" and its field; it never fails the other rows.

    Optional model_config (at log or load time): "controlnet" and "depth_detector" as
    infer.controlnet / infer.depth_detector, "requests" as [infer.requests] (RequestDefaults).
    There is no requests folder: local paths are refused unless under requests.allowed_roots.
    """

    def load_context(self, context) -> None:
        import torch

        from components.inference.control import load_controlnet, load_depth_detector
        from components.inference.generator import Generator

        config = dict(context.model_config or {})
        unknown = sorted(set(config) - set(PYFUNC_MODEL_CONFIG))
        if unknown:
            known = ", ".join(PYFUNC_MODEL_CONFIG)
            raise ValueError(f"model_config: unknown key {unknown[0]!r} (known: {known})")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        controlnet, depth = config.get("controlnet"), config.get("depth_detector")
        parts = dataclasses.replace(
            load_package(Path(context.artifacts[PACKAGE_ARTIFACT])),
            controlnet=load_controlnet(controlnet) if controlnet else None,
            depth_detector=load_depth_detector(depth, device=device) if depth else None,
        )
        self.defaults = defaults_from_plain(config.get("requests") or {})
        self.generator = Generator(
            parts, device=device, compute_dtype="bfloat16" if device == "cuda" else "float32"
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = model_input.to_dict("records")
        return pd.DataFrame(
            [self._answer(row, position) for position, row in enumerate(rows)],
            columns=list(PYFUNC_RESULT_COLUMNS),
        )

    def _answer(self, row: dict[str, Any], position: int) -> dict[str, Any]:
        row = {**row, "id": request_id(row, position)}
        outcome = generate_row(self.generator, row, base_dir=None, defaults=self.defaults)
        return outcome.result | {"png": None if outcome.image is None else png_bytes(outcome.image)}


def request_signature() -> ModelSignature:
    """The pyfunc signature: every REQUEST_FIELDS column, all optional (a row that leaves a
    field out takes its default; a bad value is a per-row error). Images are encoded bytes,
    focus is JSON text, control a list of {kind, image (bytes), strength?, preprocessed?}. MLflow
    holds no missing value in an integer column: send seed / steps for every row or none."""
    string, binary, double, long = (
        DataType.string,
        DataType.binary,
        DataType.double,
        DataType.long,
    )
    control = Array(
        Object(
            [
                Property("kind", string),
                Property("image", binary),
                Property("strength", double, required=False),
                Property("preprocessed", DataType.boolean, required=False),
            ]
        )
    )
    request_types = dict.fromkeys(("id", "mode", "prompt", "focus", "aspect"), string)
    request_types |= dict.fromkeys(("image", "mask"), binary) | {"control": control}
    request_types |= dict.fromkeys(("strength", "guidance", "cfg_scale"), double)
    request_types |= dict.fromkeys(("seed", "steps"), long)
    result_types = dict.fromkeys(RESULT_COLUMNS, string)
    result_types |= dict.fromkeys(("seed", "steps", "width", "height"), long) | {"png": binary}
    return ModelSignature(
        inputs=Schema(
            [ColSpec(request_types[name], name, required=False) for name in REQUEST_FIELDS]
        ),
        outputs=Schema(
            [ColSpec(result_types[name], name, required=False) for name in PYFUNC_RESULT_COLUMNS]
        ),
    )


def register_model(
    *,
    package_dir: Path,
    tracking_uri: str,
    model_name: str,
    run_id: str,
    gate: dict[str, float],
    tags: dict[str, str],
    alias: str | None = CANDIDATE_ALIAS,
) -> str:
    """Log the package into run `run_id`, register it as a new version of model_name, tag it
    (`tags` as given: lineage; `gate.<name>` for each gate metric) and set `alias` on it
    (`candidate`; None sets none).

    The logged model belongs to the run's experiment and is linked as the run's output; the
    version's run_id is run_id. Returns the new version (a string).
    """
    package_dir = Path(package_dir)
    read_manifest(package_dir)
    version_tags = {str(key): str(value) for key, value in tags.items()}
    version_tags |= {f"{GATE_TAG_PREFIX}{name}": _gate_text(name, v) for name, v in gate.items()}
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=MODEL_ARTIFACT_NAME,
        source_run_id=run_id,
        tags={"package_dir": str(package_dir.absolute())},
    )
    # log_model, and a SQLite registry store resolving a models:/<id> source, read the
    # process-wide tracking URI (MLflow 3.17), whatever the client's URI.
    with _tracking_uri(tracking_uri), warnings.catch_warnings():
        # No input example on purpose: MLflow would run predict (load the whole model) to check it.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        try:
            mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=QwenFluxPyfunc(),
                artifacts={PACKAGE_ARTIFACT: str(package_dir)},
                signature=request_signature(),
                model_config=PYFUNC_MODEL_CONFIG,
                pip_requirements=_pip_requirements(),
                model_id=logged.model_id,
            )
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        if client.get_logged_model(logged.model_id).status != LoggedModelStatus.READY:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        _ensure_registered_model(client, model_name)
        version = client.create_model_version(
            model_name,
            source=f"models:/{logged.model_id}",
            run_id=run_id,
            tags=version_tags,
            model_id=logged.model_id,
        )
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def promote(
    *,
    tracking_uri: str,
    model_name: str,
    version: str | None = None,
    metric: str = "validation_loss",
) -> PromotionDecision:
    """Make the candidate (alias `candidate`, or `version`) the `champion` if there is none or
    its `gate.<metric>` tag is strictly lower than the champion's. A missing or non-numeric gate
    tag on either is an error (RegistryError), never a silent pass."""
    client = MlflowClient(tracking_uri)
    aliases = _aliases(client, model_name, tracking_uri)
    if version is None:
        version = _alias_version(aliases, model_name, CANDIDATE_ALIAS)
    candidate = _model_version(client, model_name, str(version))
    candidate_value = _gate_value(candidate, metric)
    champion_version = aliases.get(CHAMPION_ALIAS)
    champion_value = None
    tag = f"{GATE_TAG_PREFIX}{metric}"
    if champion_version is None:
        promoted = True
        message = f"version {candidate.version} ({tag} {candidate_value:.6g}) is the first champion"
    elif champion_version == str(candidate.version):
        promoted = False
        champion_value = candidate_value
        message = f"version {candidate.version} is already the champion"
    else:
        # A newer dataset version holds out other rows: compare on the candidate's own rows
        # when its gate measured this champion there (components/evaluation/gate.py).
        if candidate.tags.get(f"{GATE_TAG_PREFIX}champion_version") == champion_version:
            champion_value = _gate_value(candidate, f"champion_{metric}")
        else:
            champion = _model_version(client, model_name, champion_version)
            champion_value = _gate_value(champion, metric)
        promoted = candidate_value < champion_value
        verdict = "replaces" if promoted else "does not beat"
        message = (
            f"version {candidate.version} ({tag} {candidate_value:.6g}) {verdict} champion "
            f"version {champion_version} ({champion_value:.6g})"
        )
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, str(candidate.version))
    return PromotionDecision(
        promoted=promoted,
        metric=metric,
        candidate_version=str(candidate.version),
        candidate_value=candidate_value,
        champion_version=champion_version,
        champion_value=champion_value,
        message=message,
    )


def resolve_package(model_uri: str, *, tracking_uri: str, dst: Path) -> tuple[Path, str, str]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (package folder, name, version).

    The version's `package` artifact is downloaded to dst/NAME/VERSION/ (a staging folder moved
    into place whole; a complete earlier download is reused). RegistryError for an unknown
    model, alias or version.
    """
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise ValueError(f"model URI {model_uri!r} is not models:/NAME@ALIAS or models:/NAME/N")
    name = match["name"]
    if name.startswith(".") or "\\" in name:
        raise ValueError(f"model name {name!r} cannot name a local folder")
    client = MlflowClient(tracking_uri)
    if match["alias"]:
        version = _alias_version(_aliases(client, name, tracking_uri), name, match["alias"])
    else:
        version = str(_model_version(client, name, match["version"]).version)
    target = Path(dst) / name / version
    if (target / DOWNLOAD_MARKER).is_file() and (target / PACKAGE_FILE).is_file():
        return target, name, version
    _download_package(client, name, version, target=target, tracking_uri=tracking_uri)
    return target, name, version


def load_parts(model_uri: str, *, tracking_uri: str, cache_dir: Path) -> GeneratorParts:
    """resolve_package into cache_dir + load_package (hash cache in cache_dir too)."""
    package_dir, name, version = resolve_package(
        model_uri, tracking_uri=tracking_uri, dst=Path(cache_dir)
    )
    return load_package(package_dir, name=name, version=version, hash_cache_dir=Path(cache_dir))


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Set the process-wide tracking URI for the block only (MLflow keeps one per process)."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _pip_requirements() -> list[str]:
    """Pinned from what is installed (saves MLflow's slow requirement inference, which loads
    the model in a subprocess)."""
    requirements = []
    for package in _REQUIREMENTS:
        try:
            requirements.append(f"{package}=={installed_version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def _gate_text(name: str, value: float) -> str:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"gate metric {name!r} is {value!r}; a gate value must be finite")
    return repr(number)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _is_not_found(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _aliases(client: MlflowClient, name: str, tracking_uri: str) -> dict[str, str]:
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if _is_not_found(error):
            raise RegistryError(
                f"registered model {name!r} does not exist at {tracking_uri}"
            ) from None
        raise
    return {alias: str(version) for alias, version in registered.aliases.items()}


def _alias_version(aliases: dict[str, str], name: str, alias: str) -> str:
    if alias not in aliases:
        known = ", ".join(sorted(aliases)) or "none"
        raise RegistryError(f"registered model {name!r} has no alias {alias!r} (aliases: {known})")
    return aliases[alias]


def _model_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        if _is_not_found(error):
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


def _gate_value(model_version, metric: str) -> float:
    tag = f"{GATE_TAG_PREFIX}{metric}"
    text = model_version.tags.get(tag)
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RegistryError(
            f"registered model {model_version.name!r} version {model_version.version}: tag {tag!r} "
            f"is {text!r}; promotion needs a finite gate value on both versions"
        )
    return value


def _download_package(
    client: MlflowClient, name: str, version: str, *, target: Path, tracking_uri: str
) -> None:
    """Download the version's package artifact into a staging folder, then move it to target."""
    root = client.get_model_version_download_uri(name, version).rstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        mlmodel = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root}/MLmodel", dst_path=str(staging), tracking_uri=tracking_uri
        )
        package_path = _package_artifact_path(Path(mlmodel), name=name, version=version)
        downloaded = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root}/{package_path}",
            dst_path=str(staging / "download"),
            tracking_uri=tracking_uri,
        )
        package = Path(downloaded)
        read_manifest(package)
        marker = {"model": name, "version": version, "source": f"{root}/{package_path}"}
        (package / DOWNLOAD_MARKER).write_text(json.dumps(marker))
        try:
            os.replace(package, target)
        except OSError:
            # Another process moved a complete copy into place first: keep that one.
            if not (target / DOWNLOAD_MARKER).is_file():
                raise RegistryError(
                    f"{target} exists but is not a complete download of {name} version "
                    f"{version}: remove it and retry"
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _package_artifact_path(mlmodel: Path, *, name: str, version: str) -> str:
    from mlflow.models import Model

    flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(PACKAGE_ARTIFACT)
    if not artifact or "path" not in artifact:
        raise RegistryError(
            f"registered model {name!r} version {version} has no {PACKAGE_ARTIFACT!r} artifact: "
            "it was not logged by register_model"
        )
    return str(artifact["path"])
