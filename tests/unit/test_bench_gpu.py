"""tests/benchmarks/bench_gpu.py, the one prepared GPU check: its --smoke run (the same code at toy
size on CPU) prints every row with a number, and importing it pulls in nothing that the bare GPU
box lacks (it has torch, diffusers and transformers only)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Subprocesses that import torch, diffusers and transformers: seconds each, not a unit test's < 1 s.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
BENCHMARK = ROOT / "tests" / "benchmarks" / "bench_gpu.py"
ROWS = (
    "double_block",
    "single_block",
    "stage1_memory",
    "stage1_step",
    "qwen_encode",
    "vae_encode",
    "tail_replay",
)
ABSENT_ON_THE_GPU_BOX = ("ray", "mlflow", "pyarrow", "pandas", "img2dataset", "pipelines")


def _environment() -> dict[str, str]:
    temporary = ROOT / ".tmp"
    temporary.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(temporary), "HF_HUB_OFFLINE": "1"}


def _table_rows(output: str) -> dict[str, list[str]]:
    """Row name -> its cells (measured, reference, ratio, notes) of the printed markdown table."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("row", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_smoke_run_prints_every_row_with_a_number():
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--smoke", "--steps", "2"],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("card: cpu (smoke)"), result.stdout
    rows = _table_rows(result.stdout)
    assert sorted(rows) == sorted(ROWS), result.stdout
    for name, (measured, reference, _ratio, _notes) in rows.items():
        assert not measured.startswith("error"), f"{name}: {measured}"
        # On CPU the memory row has no allocator peak: its number is the planner's reference.
        assert re.search(r"\d", measured if name != "stage1_memory" else reference), name
    assert rows["tail_replay"][3].startswith("pass")
    assert re.search(r"total [\d.]+ s", result.stdout)


def test_importing_the_benchmark_pulls_in_no_pipeline_framework():
    probe = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('bench_gpu', {str(BENCHMARK)!r})\n"
        "module = sys.modules['bench_gpu'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert {"torch", "diffusers", "transformers", "model", "components"} <= loaded
    assert loaded.isdisjoint(ABSENT_ON_THE_GPU_BOX), sorted(loaded & set(ABSENT_ON_THE_GPU_BOX))
