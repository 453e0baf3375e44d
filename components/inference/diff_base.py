"""Which parameters of a model package differ from its base checkpoints, and by how much.

Input: a package folder (components/inference/package.py), a FLUX.1-dev-layout folder and a
Qwen2-VL checkpoint folder to compare with (by default the package's recorded bases; for an
imported release, name the stock checkpoints). Tensors are streamed by name from the
safetensors files of both sides (one tensor in memory at a time; a 12B transformer is never
built), compared at the lower precision of the two (a bf16 package equals a fp32 base where the
base rounds to it), and grouped:
  FLUX   per block (index 0..56: double blocks first) and part (model/flux_stages.py:
         attention, mlp, output, modulation, norms), plus the parameters outside the blocks
  tail   Qwen2-VL's last decoder layer (attention, mlp, norms) and final norm
  new    networks without a base (connector, T5 embedder): listed, never "unchanged"
For each group: parameters, parameters that changed, and the relative size of the change
||W - W0|| / ||W0|| (Frobenius, over the group).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from components.inference.package import CONNECTOR_FILE, T5_EMBEDDER_FILE, TAIL_FILE
from components.training.encoder_tail import checkpoint_weight_map, locate_tail
from model.flux_stages import flux_parameter_group

_TRANSFORMER_STEM = "diffusion_pytorch_model"


@dataclass
class GroupDiff:
    """One group's sizes: parameters, changed parameters, sum of squares of W0 and of W - W0."""

    params: int = 0
    changed: int = 0
    base_sq: float = 0.0
    delta_sq: float = 0.0

    def add(self, trained: torch.Tensor, base: torch.Tensor) -> None:
        trained, base = _common_precision(trained, base)
        self.params += trained.numel()
        delta = trained.double() - base.double()
        self.changed += int((delta != 0).sum())
        self.base_sq += float(base.double().square().sum())
        self.delta_sq += float(delta.square().sum())

    @property
    def relative_change(self) -> float:
        if self.base_sq == 0.0:
            return 0.0 if self.delta_sq == 0.0 else math.inf
        return math.sqrt(self.delta_sq / self.base_sq)


@dataclass
class BaseDiff:
    """Every group of a package against its bases."""

    flux: dict[tuple[str, str], GroupDiff] = field(default_factory=dict)
    """(block label, part) -> diff; block label "12" (an index) or a top-level module name."""
    tail: dict[str, GroupDiff] = field(default_factory=dict)
    new: dict[str, int] = field(default_factory=dict)
    """Networks without a base: name -> parameters."""

    def changed_blocks(self) -> list[int]:
        """FLUX block indices with any changed parameter, ascending."""
        return sorted(
            {
                int(block)
                for (block, _), diff in self.flux.items()
                if block.isdigit() and diff.changed
            }
        )

    def changed_parts(self) -> dict[int, list[str]]:
        """Changed parts of each changed FLUX block."""
        parts: dict[int, list[str]] = {}
        for (block, part), diff in sorted(self.flux.items()):
            if block.isdigit() and diff.changed:
                parts.setdefault(int(block), []).append(part)
        return parts

    def changed_params(self) -> dict[str, int]:
        """Parameters of the groups that changed at all (a group counts whole), per side."""
        flux = sum(diff.params for diff in self.flux.values() if diff.changed)
        tail = sum(diff.params for diff in self.tail.values() if diff.changed)
        return {"flux": flux, "tail": tail, "new": sum(self.new.values())}

    def as_dict(self) -> dict:
        """The report as JSON-ready data: every group, changed or not."""

        def group(diff: GroupDiff) -> dict:
            return {
                "params": diff.params,
                "changed": diff.changed,
                # None where the base is all zeros and the weights are not (no finite ratio).
                "relative_change": (
                    diff.relative_change if math.isfinite(diff.relative_change) else None
                ),
            }

        return {
            "flux": [
                {"block": block, "part": part, **group(diff)}
                for (block, part), diff in sorted(self.flux.items(), key=lambda i: _order(i[0]))
            ],
            "tail": {part: group(diff) for part, diff in sorted(self.tail.items())},
            "new": dict(sorted(self.new.items())),
            "changed_blocks": self.changed_blocks(),
            "changed_params": self.changed_params(),
        }

    def format(self) -> str:
        lines = ["FLUX transformer (changed groups; relative change ||W - W0|| / ||W0||):"]
        for (block, part), diff in sorted(self.flux.items(), key=lambda item: _order(item[0])):
            if diff.changed:
                lines.append(
                    f"  block {block:>4} {part:<11} {diff.params:>14,} params, "
                    f"{diff.changed / diff.params:6.1%} changed, "
                    f"relative {diff.relative_change:.3g}"
                )
        unchanged = sorted(
            {int(b) for (b, _), d in self.flux.items() if b.isdigit()} - set(self.changed_blocks())
        )
        by_part: dict[str, int] = {}
        for (block, part), diff in self.flux.items():
            if block.isdigit() and diff.changed:
                by_part[part] = by_part.get(part, 0) + diff.params
        shown = ", ".join(f"{part} {count:,}" for part, count in sorted(by_part.items()))
        lines.append(f"  changed parameters by part: {shown or 'none'}")
        lines.append(f"  changed blocks: {self.changed_blocks()}")
        lines.append(f"  unchanged blocks: {unchanged}")
        lines.append("Qwen2-VL tail (last layer + final norm):")
        for part, diff in sorted(self.tail.items()):
            state = f"relative {diff.relative_change:.3g}" if diff.changed else "unchanged"
            lines.append(f"  {part:<11} {diff.params:>14,} params, {state}")
        for name, params in sorted(self.new.items()):
            lines.append(f"{name}: {params:,} params, no base (new)")
        totals = self.changed_params()
        lines.append(
            f"parameters in changed groups: FLUX {totals['flux']:,}, tail {totals['tail']:,}, "
            f"new {totals['new']:,}, total {sum(totals.values()):,}"
        )
        return "\n".join(lines)


def diff_package(package_dir: Path, *, flux_base: Path, qwen2vl_base: Path) -> BaseDiff:
    """The package at `package_dir` against `flux_base` (a diffusers FLUX folder) and
    `qwen2vl_base` (a Qwen2-VL checkpoint folder); see the module docstring."""
    package_dir = Path(package_dir)
    report = BaseDiff()
    config = json.loads((package_dir / "transformer" / "config.json").read_text())
    num_double = int(config["num_layers"])
    with ExitStack() as stack:
        base = _TensorSource(Path(flux_base) / "transformer", _TRANSFORMER_STEM, stack)
        for name, trained in _tensors(package_dir / "transformer", _TRANSFORMER_STEM):
            group = flux_parameter_group(name, num_double=num_double)
            report.flux.setdefault(group, GroupDiff()).add(trained, base.get(name))
        _diff_tail(report, package_dir, _TensorSource(Path(qwen2vl_base), "model", stack))
    for name, file in (("connector", CONNECTOR_FILE), ("t5_embedder", T5_EMBEDDER_FILE)):
        if (package_dir / file).is_file():
            with safe_open(str(package_dir / file), framework="pt", device="cpu") as handle:
                shapes = [handle.get_slice(key).get_shape() for key in handle.keys()]
                report.new[name] = sum(math.prod(shape) for shape in shapes)
    return report


class _TensorSource:
    """Tensors of a (sharded) safetensors checkpoint by name, each file opened once."""

    def __init__(self, folder: Path, stem: str, stack: ExitStack) -> None:
        self.folder, self.files, self.stack = folder, _tensor_files(folder, stem), stack
        self.handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.folder}: the base checkpoint has no tensor {name!r}")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(
                safe_open(str(file), framework="pt", device="cpu")
            )
        return self.handles[file].get_tensor(name)


def _diff_tail(report: BaseDiff, package_dir: Path, base: _TensorSource) -> None:
    location = locate_tail(base.folder, name=str(base.folder))
    with safe_open(str(package_dir / TAIL_FILE), framework="pt", device="cpu") as tail:
        for key in sorted(tail.keys()):
            part = "final norm" if key.startswith("norm.") else _tail_part(key[len("layer.") :])
            base_tensor = base.get(location.checkpoint_name(key))
            report.tail.setdefault(part, GroupDiff()).add(tail.get_tensor(key), base_tensor)


def _tail_part(name: str) -> str:
    if name.startswith("self_attn."):
        return "attention"
    if name.startswith("mlp."):
        return "mlp"
    return "norms"


def _tensor_files(folder: Path, stem: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (index or single file)."""
    weight_map = checkpoint_weight_map(folder, name=str(folder), stem=stem)
    return {name: folder / file for name, file in weight_map.items()}


def _tensors(folder: Path, stem: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (sharded) safetensors checkpoint, file by file, one at a time."""
    by_file: dict[Path, list[str]] = {}
    for name, file in _tensor_files(folder, stem).items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in sorted(names):
                yield name, handle.get_tensor(name)


def _common_precision(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both at the narrower float type of the two (bf16 < fp16 < fp32 < fp64 by bits)."""
    if a.dtype == b.dtype:
        return a, b
    narrow = min((a.dtype, b.dtype), key=lambda dtype: torch.finfo(dtype).bits)
    return a.to(narrow), b.to(narrow)


def _order(key: tuple[str, str]) -> tuple[int, str, str]:
    block, part = key
    return (int(block), "", part) if block.isdigit() else (10**6, block, part)
