"""docs/operations.md, command by command: every shell command in its fenced blocks (```bash,
```sh, ```console, bare ```) is mapped in DOC_COMMANDS to the tests that exercise it, and
those tests exist. Every `qwenflux` command parses with the CLI's own parser and its preset and
`--set` keys load; `mlflow ui` parses with MLflow's CLI; `make` targets exist in the Makefile;
deploy-side commands name files under infra/ that exist. A renamed flag, key, target or file
breaks this test, and so does a new command without a test.

A command's key (see `command_key`) is `qwenflux <subcommand>` (plus the target for `run`),
`<tool> <subcommand>` for other tools, and every infra/ path the command names.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines import cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
SHELL_FENCES = ("bash", "sh", "console", "")
PLACEHOLDER = re.compile(r"<[A-Za-z_ ]+>")
"""`<RUN_ID>`-style placeholders, replaced by SAMPLE before parsing."""
SAMPLE = "sample"

THIS = "tests/unit/test_operations_doc.py"
INFRA = "tests/unit/test_infra_manifests.py"
PIPELINE = "tests/integration/test_workflow_pipeline.py"
ENGINE = "tests/integration/test_workflow_engine.py"
CLUSTER = "tests/integration/test_cluster_submit.py"
AUTH = "tests/integration/test_mlflow_auth.py"
MAKE_TARGETS = f"{THIS}::test_make_targets_in_the_doc_exist"
RESUME = [
    "tests/integration/test_workflow_resume.py::"
    "test_a_run_killed_inside_every_step_finishes_like_an_uninterrupted_one",
    "tests/integration/test_workflow_resume.py::"
    "test_a_new_url_list_is_a_new_dataset_version_trained_registered_and_gated",
]
CORE = [
    f"{INFRA}::test_every_yaml_file_parses_and_starts_with_a_header_comment",
    f"{INFRA}::test_core_kinds_validate_strictly",
    f"{INFRA}::test_containers_pin_images_and_bound_resources",
    f"{INFRA}::test_credentials_come_only_from_secrets",
]
KUBERAY = [
    f"{INFRA}::test_every_yaml_file_parses_and_starts_with_a_header_comment",
    f"{INFRA}::test_kuberay_kinds_have_the_fields_kuberay_reads",
    f"{INFRA}::test_every_kuberay_kind_and_target_is_shipped",
    f"{INFRA}::test_containers_pin_images_and_bound_resources",
    f"{INFRA}::test_credentials_come_only_from_secrets",
]
SCHEDULES = [f"{INFRA}::test_the_kubernetes_schedules_forbid_overlap_and_name_the_run"]
SYSTEMD = [f"{INFRA}::test_the_systemd_units_submit_with_a_dated_run_id"]
VM_CLUSTER = [f"{INFRA}::test_the_vm_cluster_pins_its_image_and_keeps_work_off_the_head"]

DOC_COMMANDS: dict[str, list[str]] = {
    # Install, demo, tests. No test runs `make` itself: the targets are checked to exist, and
    # the demo's workflow (`qwenflux run all` on the tiny preset) and tiny models are tested.
    "make install": [MAKE_TARGETS],
    "make demo": [
        MAKE_TARGETS,
        f"{PIPELINE}::test_run_all_reuses_the_trained_steps_and_finishes_the_workflow",
        "tests/unit/test_tiny_models.py::test_complete_build_is_skipped_and_seed_change_rebuilds",
    ],
    "make test": [MAKE_TARGETS],
    "make test-cluster": [MAKE_TARGETS],
    "make test-workflow": [MAKE_TARGETS, *RESUME],
    "make test-fast": [MAKE_TARGETS],
    "mlflow ui": [
        f"{THIS}::test_mlflow_ui_commands_parse_with_mlflow_cli",
        f"{PIPELINE}::test_run_all_reuses_the_trained_steps_and_finishes_the_workflow",
    ],
    # The workflow and its status.
    "qwenflux run all": [
        f"{PIPELINE}::test_run_all_reuses_the_trained_steps_and_finishes_the_workflow",
        f"{PIPELINE}::test_a_rerun_reuses_every_step_and_a_changed_gate_input_reruns_only_the_gate",
        f"{ENGINE}::test_from_forces_a_new_run_from_that_step",
        f"{ENGINE}::test_a_failed_run_resumes_under_its_id_and_keeps_its_done_steps",
        f"{AUTH}::test_without_credentials_the_workflow_stops_before_any_work",
        *RESUME,
        "tests/unit/test_config_loading.py::test_overrides_parse_against_field_types",
    ],
    "qwenflux run train": [
        f"{ENGINE}::test_targets_take_their_upstream_and_unneeded_steps_are_not_run",
        f"{CLUSTER}::test_a_submitted_workflow_runs_across_two_nodes_like_a_local_run",
    ],
    "qwenflux status": [
        f"{PIPELINE}::test_run_all_reuses_the_trained_steps_and_finishes_the_workflow",
        f"{PIPELINE}::test_a_rerun_reuses_every_step_and_a_changed_gate_input_reruns_only_the_gate",
        f"{CLUSTER}::test_a_submitted_workflow_runs_across_two_nodes_like_a_local_run",
    ],
    "qwenflux submit": [
        "tests/unit/test_submit.py::test_a_run_id_is_added_once_and_kept_when_given",
        "tests/unit/test_submit.py::test_credentials_come_from_the_environment_only_when_set",
        "tests/unit/test_submit.py::test_a_bad_workflow_command_fails_here_before_any_job",
        f"{CLUSTER}::test_a_submitted_workflow_runs_across_two_nodes_like_a_local_run",
    ],
    # Single-step commands, overrides, the plan.
    "qwenflux train": [
        "tests/integration/test_train_resume.py::"
        "test_killed_worker_then_sigkill_then_rerun_matches_straight_run",
        "tests/unit/test_config_loading.py::test_lists_of_sections_load_and_override_by_position",
    ],
    "qwenflux show-config": [f"{THIS}::test_the_show_config_examples_print_their_overrides"],
    "qwenflux plan": [
        "tests/unit/test_plan.py::test_cli_plan_goes_through_the_strict_loader",
        "tests/unit/test_plan.py::test_set_overrides_change_the_plan",
        "tests/unit/test_plan.py::test_tiny_preset_plans_the_checkpoints_it_names",
    ],
    # Deploy side: the tests validate the very files the commands apply.
    "docker build infra/docker/Dockerfile": [
        f"{INFRA}::test_dockerfiles_pin_their_bases_and_run_as_non_root",
        f"{INFRA}::test_the_main_image_keeps_the_hf_cache_on_the_shared_volume",
    ],
    "docker build infra/mlflow/Dockerfile": [
        f"{INFRA}::test_dockerfiles_pin_their_bases_and_run_as_non_root",
    ],
    "kubectl apply infra/kubernetes/namespace.yaml": CORE,
    "kubectl apply infra/kubernetes/pvc-shared.yaml": CORE,
    "kubectl apply infra/mlflow/mlflow-server.yaml": CORE,
    "kubectl apply infra/kuberay/networkpolicy-download-egress.yaml": CORE,
    "kubectl create infra/kuberay/rayjob-data.yaml": KUBERAY,
    "kubectl create infra/kuberay/rayjob-train.yaml": KUBERAY,
    "kubectl create infra/kuberay/rayjob-all.yaml": KUBERAY,
    "kubectl apply infra/kuberay/raycluster.yaml": KUBERAY,
    "kubectl port-forward": [
        f"{INFRA}::test_kuberay_kinds_have_the_fields_kuberay_reads",
        f"{THIS}::test_deploy_side_commands_name_files_and_services_that_exist",
    ],
    "kubectl apply infra/kuberay/raycronjob-nightly.yaml": KUBERAY,
    "kubectl apply infra/kubernetes/cronjob-rayjob.yaml": CORE + SCHEDULES,
    "kubectl apply infra/kubernetes/cronjob-submit.yaml": CORE + SCHEDULES,
    "ray up infra/ray-cluster-launcher/cluster.yaml": VM_CLUSTER,
    "ray dashboard infra/ray-cluster-launcher/cluster.yaml": VM_CLUSTER,
    "install infra/schedule/qwenflux-nightly.cron": [
        f"{INFRA}::test_the_crontab_submits_with_a_dated_run_id",
    ],
    "cp infra/schedule/qwenflux-nightly.service infra/schedule/qwenflux-nightly.timer": SYSTEMD,
    "systemctl daemon-reload": SYSTEMD,
    "systemctl enable": SYSTEMD,
}
"""Each doc command's key -> the tests ("path::name") that exercise it."""


def doc_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command in the shell blocks of `text`: comment and
    blank lines skipped, `\\` continuations joined, a console block's `$ ` prompt stripped (its
    other lines are output)."""
    commands: list[tuple[int, str]] = []
    fence: str | None = None
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        if stripped.startswith("$ "):
            stripped = stripped[2:].strip()
        elif fence == "console" and not pending:
            continue
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        commands.append((start, pending + stripped))
        pending = ""
    return commands


def command_words(command: str) -> list[str]:
    """The command's words, without `sudo`, leading VAR=value assignments and placeholders."""
    words = shlex.split(PLACEHOLDER.sub(SAMPLE, command), comments=True)
    while words and (words[0] == "sudo" or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
        words = words[1:]
    return words


def command_key(words: list[str]) -> str:
    """`qwenflux <subcommand>` (+ the target of `run`); for other tools the tool's name, its
    subcommand when the second word is one, and every infra/ path the command names."""
    tool, rest = Path(words[0]).name, words[1:]
    if tool == "qwenflux":
        key = ["qwenflux", rest[0]]
        if rest[0] == "run" and len(rest) > 1:
            key.append(rest[1])
        return " ".join(key)
    key = [tool]
    if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        key.append(rest[0])
    key += [word for word in rest if word.startswith("infra/")]
    return " ".join(key)


COMMANDS = doc_commands(DOC.read_text())
WORDS = [(number, command, command_words(command)) for number, command in COMMANDS]
QWENFLUX = [(n, c, w) for n, c, w in WORDS if Path(w[0]).name == "qwenflux"]


def _ids(items) -> list[str]:
    return [f"line{number}" for number, *_ in items]


def test_the_doc_has_commands_in_every_part():
    keys = {command_key(words) for _, _, words in WORDS}
    for expected in ("make install", "make demo", "make test", "qwenflux submit"):
        assert expected in keys, f"docs/operations.md has no `{expected}` command any more"


def test_every_doc_command_is_mapped_to_a_test():
    missing = [
        f"line {number}: `{command}` (key {command_key(words)!r})"
        for number, command, words in WORDS
        if command_key(words) not in DOC_COMMANDS
    ]
    assert not missing, (
        "docs/operations.md has commands no test exercises; add a test and map the key in "
        "DOC_COMMANDS (tests/unit/test_operations_doc.py), or drop the command from the doc:\n"
        + "\n".join(missing)
    )


def test_every_mapping_entry_is_a_command_of_the_doc():
    keys = {command_key(words) for _, _, words in WORDS}
    stale = sorted(set(DOC_COMMANDS) - keys)
    assert not stale, f"DOC_COMMANDS maps commands docs/operations.md no longer has: {stale}"


def test_every_mapped_test_exists():
    missing = []
    for key, tests in DOC_COMMANDS.items():
        assert tests, f"{key!r} maps to no test"
        for test in tests:
            path, _, name = test.partition("::")
            file = ROOT / path
            pattern = rf"^(async )?def {re.escape(name)}\("
            if not file.is_file() or not re.search(pattern, file.read_text(), re.MULTILINE):
                missing.append(f"{key!r}: {test}")
    assert not missing, "mapped tests that do not exist:\n" + "\n".join(missing)


def _parse(words: list[str]):
    """The CLI parser's namespace for `words`, or a test failure with argparse's message."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return cli._parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"`qwenflux {shlex.join(words)}` does not parse:\n{errors.getvalue()}")


def _workflow(args) -> list[str]:
    """The `run ...` words after `submit ... --`, as `qwenflux submit` takes them."""
    return args.workflow[1:] if args.workflow[:1] == ["--"] else args.workflow


@pytest.mark.parametrize(("number", "command", "words"), QWENFLUX, ids=_ids(QWENFLUX))
def test_every_qwenflux_command_parses_and_its_config_loads(number, command, words):
    from pipelines.config import load_config

    args = _parse(words[1:])
    if args.command == "submit":
        args = _parse(_workflow(args))
        assert args.command == "run", f"line {number}: submit must be given `-- run ...`"
    if hasattr(args, "config"):
        load_config(args.config, args.overrides)


def test_make_targets_in_the_doc_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.MULTILINE))
    named = {words[1] for _, _, words in WORDS if words[0] == "make"}
    assert named, "no make command in the doc"
    assert named <= targets, f"make targets the Makefile lacks: {sorted(named - targets)}"


def test_mlflow_ui_commands_parse_with_mlflow_cli():
    import click
    from mlflow.cli import cli as mlflow_cli

    ui = [words for _, _, words in WORDS if Path(words[0]).name == "mlflow"]
    assert ui, "no mlflow command in the doc"
    for words in ui:
        assert words[1] == "ui", words
        command = mlflow_cli.get_command(click.Context(mlflow_cli), "ui")
        try:
            command.make_context("ui", words[2:])
        except click.UsageError as error:
            pytest.fail(f"`{shlex.join(words)}`: {error}")


def _ray_cluster_names() -> set[str]:
    names = set()
    for path in (ROOT / "infra").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayCluster":
                names.add(doc["metadata"]["name"])
    return names


def test_deploy_side_commands_name_files_and_services_that_exist():
    paths = [word for _, _, words in WORDS for word in words if word.startswith("infra/")]
    assert paths, "no infra/ file in the doc's commands"
    missing = sorted({path for path in paths if not (ROOT / path).exists()})
    assert not missing, f"commands name infra files that do not exist: {missing}"
    services = [
        match[1]
        for _, command, _ in WORDS
        for match in re.finditer(r"svc/([a-z0-9-]+)-head-svc\b", command)
    ]
    unknown = sorted(set(services) - _ray_cluster_names())
    assert not unknown, f"port-forwards to the head of RayClusters infra/ lacks: {unknown}"


def test_the_show_config_examples_print_their_overrides(capsys):
    examples = [words for _, _, words in QWENFLUX if words[1] == "show-config"]
    assert examples, "no show-config example in the doc"
    for words in examples:
        assert cli.main(words[1:]) == 0
        printed = json.loads(capsys.readouterr().out)
        for assignment in _parse(words[1:]).overrides:
            dotted, _, value = assignment.partition("=")
            node = printed
            for part in dotted.split("."):
                node = node[int(part) - 1] if isinstance(node, list) else node[part]
            assert str(node) == value or float(node) == float(value), (dotted, node, value)
