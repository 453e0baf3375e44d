"""The deployment files under infra/, checked offline (no Docker, no Kubernetes here).

Every YAML file parses. Core Kubernetes kinds, and the pod templates inside KubeRay kinds,
validate strictly (unknown fields are errors) against the Kubernetes schemas that
kubernetes-validate ships, for one pinned version. KubeRay kinds, which it does not know, get
structural checks of the fields KubeRay reads (names from KubeRay v1.6.2's Go types). Across
all manifests: pinned images, CPU and memory requests and limits on every container, and
credentials only through Secret references; the only Secrets are placeholders. Also the
Dockerfiles (non-root, pinned bases), the VM cluster config and the schedules.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipelines.cli import WORKFLOW_TARGETS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S_VERSION = "1.31"
"""The Kubernetes version manifests are validated against (kubernetes-validate ships 1.25+)."""
SECRETS_EXAMPLE = INFRA / "kubernetes" / "secrets.example.yaml"
PLACEHOLDER = "REPLACE_ME"
LAUNCHER = INFRA / "ray-cluster-launcher" / "cluster.yaml"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|_URI$")
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")

# Fields of KubeRay v1.6.2's types (ray-operator/apis/ray/v1): a typo fails here, as strict
# validation would fail it for a core kind.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
CLUSTER_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_FIELDS = {
    "template", "headService", "enableIngress", "resources", "labels", "rayStartParams",
    "serviceType",
}  # fmt: skip
WORKER_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}  # fmt: skip
CRONJOB_FIELDS = {"jobTemplate", "schedule", "suspend"}


def _yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[tuple[str, dict]]:
    """(where, document) for every Kubernetes object, RayJob templates in ConfigMaps included."""
    found = []
    for path in _yaml_files():
        if path == LAUNCHER:
            continue
        for index, doc in enumerate(_documents(path)):
            where = f"{path.relative_to(ROOT)}#{index}"
            found.append((where, doc))
            found.extend(_embedded(where, doc))
    return found


def _embedded(where: str, doc: dict) -> list[tuple[str, dict]]:
    """Kubernetes objects that a ConfigMap carries as YAML text (a CronJob's RayJob template),
    with the @DATE@ slot filled as the CronJob fills it."""
    if doc.get("kind") != "ConfigMap":
        return []
    found = []
    for key, text in (doc.get("data") or {}).items():
        if key.endswith((".yaml", ".yml")):
            for index, inner in enumerate(yaml.safe_load_all(text.replace("@DATE@", "2026-12-02"))):
                found.append((f"{where}/{key}#{index}", inner))
    return found


def _containers(node) -> list[dict]:
    """Every container spec anywhere below `node` (pods, templates, KubeRay groups)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(item for item in value if isinstance(item, dict))
            found.extend(_containers(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_containers(item))
    return found


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


MANIFESTS = _manifests()
IDS = [where for where, _ in MANIFESTS]
CORE = [(where, doc) for where, doc in MANIFESTS if doc.get("kind") not in KUBERAY_KINDS]
KUBERAY = [(where, doc) for where, doc in MANIFESTS if doc.get("kind") in KUBERAY_KINDS]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses_and_starts_with_a_header_comment(path):
    assert _documents(path), f"{path} holds no document"
    assert path.read_text().startswith("#"), f"{path} starts without a header comment"


@pytest.mark.parametrize(("where", "doc"), CORE, ids=[where for where, _ in CORE])
def test_core_kinds_validate_strictly(where, doc):
    assert "kind" in doc and "apiVersion" in doc, f"{where}: not a Kubernetes object"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(str(part) for part in error.path)
        pytest.fail(f"{where}: {doc['kind']} at {path}: {error.message}")


def _check_cluster_spec(where: str, spec: dict) -> None:
    assert set(spec) <= CLUSTER_FIELDS, f"{where}: unknown {set(spec) - CLUSTER_FIELDS}"
    assert spec.get("rayVersion") == "2.60.0", f"{where}: rayVersion must match the pin"
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_FIELDS, f"{where}: unknown head {set(head) - HEAD_FIELDS}"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must take no work"
    _check_pod_template(f"{where}/head", head["template"])
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for group in groups:
        name = group["groupName"]
        assert set(group) <= WORKER_FIELDS, f"{where}/{name}: unknown {set(group) - WORKER_FIELDS}"
        assert isinstance(group["replicas"], int), f"{where}/{name}: replicas"
        assert isinstance(group["rayStartParams"], dict), f"{where}/{name}: rayStartParams"
        _check_pod_template(f"{where}/{name}", group["template"])
    gpus = [_gpu_limit(group["template"]) for group in groups]
    assert 8 in gpus, f"{where}: no 8-GPU worker group (a100x8 trains 8 workers x 1 GPU)"


def _check_pod_template(where: str, template: dict) -> None:
    """A KubeRay pod template is a core PodTemplateSpec: validate it as one."""
    assert template["spec"]["containers"], f"{where}: no containers"
    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "check"},
        "template": template,
    }
    try:
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(str(part) for part in error.path)
        pytest.fail(f"{where}: pod template at {path}: {error.message}")
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True, f"{where}: runAsNonRoot"
    for container in template["spec"]["containers"]:
        assert "command" not in container, f"{where}: KubeRay writes the ray start command"


def _gpu_limit(template: dict) -> int:
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def _check_rayjob_spec(where: str, spec: dict) -> None:
    assert set(spec) <= RAYJOB_FIELDS, f"{where}: unknown {set(spec) - RAYJOB_FIELDS}"
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["qwenflux", "run"], f"{where}: entrypoint is not `qwenflux run`"
    assert words[2] in WORKFLOW_TARGETS, f"{where}: unknown target {words[2]}"
    assert "--config" in words, f"{where}: the entrypoint names no --config"
    preset = words[words.index("--config") + 1]
    assert (ROOT / "pipelines" / "configs" / f"{preset}.toml").is_file(), f"{where}: {preset}"
    assert "rayClusterSpec" in spec or "clusterSelector" in spec, f"{where}: no cluster"
    if "rayClusterSpec" in spec:
        _check_cluster_spec(f"{where}/rayClusterSpec", spec["rayClusterSpec"])
    if "submitterPodTemplate" in spec:
        _check_pod_template(f"{where}/submitter", spec["submitterPodTemplate"])


@pytest.mark.parametrize(("where", "doc"), KUBERAY, ids=[where for where, _ in KUBERAY])
def test_kuberay_kinds_have_the_fields_kuberay_reads(where, doc):
    assert doc["apiVersion"] == "ray.io/v1", f"{where}: apiVersion"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "qwenflux"
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        _check_cluster_spec(where, spec)
    elif doc["kind"] == "RayJob":
        _check_rayjob_spec(where, spec)
    else:
        assert set(spec) <= CRONJOB_FIELDS, f"{where}: unknown {set(spec) - CRONJOB_FIELDS}"
        assert len(spec["schedule"].split()) == 5, f"{where}: not a 5-field cron schedule"
        _check_rayjob_spec(f"{where}/jobTemplate", spec["jobTemplate"])


def test_every_kuberay_kind_and_target_is_shipped():
    kinds = {doc["kind"] for _, doc in KUBERAY}
    assert kinds == set(KUBERAY_KINDS)
    entrypoints = " ".join(doc["spec"].get("entrypoint", "") for _, doc in KUBERAY)
    for target in ("data", "train", "all"):
        assert f"qwenflux run {target} --config a100x8" in entrypoints


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=IDS)
def test_containers_pin_images_and_bound_resources(where, doc):
    for container in _containers(doc):
        name, image = container["name"], container.get("image", "")
        assert _pinned(image), f"{where}/{name}: image {image!r} has no pinned tag"
        resources = container.get("resources", {})
        for side in ("requests", "limits"):
            for kind in ("cpu", "memory"):
                assert kind in resources.get(side, {}), f"{where}/{name}: no {side}.{kind}"


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=IDS)
def test_credentials_come_only_from_secrets(where, doc):
    for container in _containers(doc):
        for variable in container.get("env", []):
            if not CREDENTIAL_NAME.search(variable["name"]):
                continue
            source = variable.get("valueFrom", {})
            assert "value" not in variable, f"{where}: {variable['name']} is a literal"
            assert "secretKeyRef" in source, f"{where}: {variable['name']} is not from a Secret"
    if doc.get("kind") == "Secret":
        assert where.startswith(str(SECRETS_EXAMPLE.relative_to(ROOT))), f"{where}: a Secret"
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values and set(values.values()) == {PLACEHOLDER}, f"{where}: real values?"


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*") if p.is_file()), ids=str)
def test_no_file_holds_a_credential_literal(path):
    if path == SECRETS_EXAMPLE or path.suffix == ".md":
        return
    text = path.read_text()
    assert not URL_WITH_PASSWORD.search(text), f"{path}: a URL with a password"
    assert not re.search(r"(?im)^\s*(password|secret|token)\s*[:=]\s*\S", text), path
    assert text.isascii(), f"{path}: not ASCII"


@pytest.mark.parametrize("path", sorted(INFRA.rglob("Dockerfile")), ids=str)
def test_dockerfiles_pin_their_bases_and_run_as_non_root(path):
    lines = [line.strip() for line in path.read_text().splitlines()]
    bases = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert bases and all(_pinned(base) for base in bases), f"{path}: unpinned FROM {bases}"
    users = [i for i, line in enumerate(lines) if line.upper().startswith("USER ")]
    entry = [i for i, line in enumerate(lines) if line.upper().startswith("ENTRYPOINT")]
    assert users and entry and users[-1] < entry[-1], f"{path}: no USER before ENTRYPOINT"
    user = lines[users[-1]].split()[1].split(":")[0]
    assert user not in ("root", "0"), f"{path}: runs as root"


def test_the_main_image_keeps_the_hf_cache_on_the_shared_volume():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "HF_HOME=/mnt/storage/hf-cache" in text
    assert "-c constraints.txt ." in text


def test_the_vm_cluster_pins_its_image_and_keeps_work_off_the_head():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert _pinned(config["docker"]["image"]), config["docker"]["image"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head and "--dashboard-host=0.0.0.0" in head
    assert config["head_node_type"] in config["available_node_types"]
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["ImageId"].startswith("ami-")


def _scheduled_command(text: str) -> list[str]:
    """The `qwenflux submit` words of a schedule line, after the scheduler's own unescaping."""
    line = next(line for line in text.splitlines() if "qwenflux submit" in line)
    return line[line.index("qwenflux submit") :].split()


def test_the_crontab_submits_with_a_dated_run_id():
    text = (INFRA / "schedule" / "qwenflux-nightly.cron").read_text()
    entries = [line for line in text.splitlines() if line and not line.startswith("#")]
    command = next(line for line in entries if "qwenflux submit" in line)
    assert "--run-id" in command and "--address" in command
    # cron ends the command at an unescaped % and turns the rest into standard input.
    assert not re.search(r"(?<!\\)%", command), "an unescaped % in the crontab line"
    assert "run all --config a100x8" in " ".join(_scheduled_command(text))


def test_the_systemd_units_submit_with_a_dated_run_id():
    service = (INFRA / "schedule" / "qwenflux-nightly.service").read_text()
    exec_line = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert "qwenflux submit" in exec_line and "--run-id" in exec_line
    # systemd reads a lone % as a specifier and expands $ itself: both must be doubled.
    assert not re.search(r"%", exec_line.replace("%%", "")), "a lone % in ExecStart"
    assert not re.search(r"\$", exec_line.replace("$$", "")), "a lone $ in ExecStart"
    timer = (INFRA / "schedule" / "qwenflux-nightly.timer").read_text()
    assert "OnCalendar=" in timer and "Unit=qwenflux-nightly.service" in timer


def test_the_kubernetes_schedules_forbid_overlap_and_name_the_run():
    cronjobs = [(where, doc) for where, doc in MANIFESTS if doc.get("kind") == "CronJob"]
    assert len(cronjobs) == 2
    for where, doc in cronjobs:
        assert doc["spec"]["concurrencyPolicy"] == "Forbid", where
        script = " ".join(_containers(doc)[0].get("args", []))
        assert "kubectl create -f" in script or "qwenflux submit" in script, where
        assert "$$(date -u +%F)" in script, f"{where}: the date must survive $(...) expansion"
