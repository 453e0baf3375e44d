"""The pipeline config tree and its presets (`pipelines/configs/*.toml`).

`PipelineConfig` holds one section per concern; each component's own config class lives in the
component's module and is composed here. `load_config(path, overrides)` is the only entry point
the CLI uses; `--set section.key=value` overrides are parsed against the field's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.buckets import BucketConfig
from components.download import DownloadConfig
from components.encode import EncodeConfig
from components.filters import FilterConfig
from components.url_policy import UrlPolicyConfig
from pipelines.config_loading import ConfigError, apply_override, build, load_toml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Where a run lives and how it reaches Ray."""

    name: str
    """Preset name; used in run names and the manifest."""
    root: str
    """Run directory (local path or shared mount); every output of the run lives under it."""
    seed: int = 0
    """Seed for everything random in the run (synthetic corpus, latent sampling, batching)."""
    ray_address: str | None = None
    """Ray cluster address (`ray://host:10001` or `auto`); None starts an in-process cluster."""
    local_num_cpus: int | None = None
    """CPUs the in-process cluster may use; None lets Ray count the machine's cores."""

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root must name a directory")
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ValueError("local_num_cpus must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceConfig:
    """Where the url + caption list comes from."""

    url_list: str = ""
    """Parquet or JSONL file with `url`, `caption` and optional score columns; empty = generate
    the synthetic demo corpus into the run directory."""
    serve_dir: str = ""
    """Folder served over HTTP on 127.0.0.1 for the run; relative urls resolve against it."""
    synthetic_count: int = 96
    """Images in the synthetic demo corpus (used when url_list is empty)."""
    synthetic_max_side_px: int = 160
    """Longest side of the synthetic demo images."""

    def __post_init__(self) -> None:
        if self.synthetic_count < 1:
            raise ValueError("synthetic_count must be >= 1")
        if self.synthetic_max_side_px < 16:
            raise ValueError("synthetic_max_side_px must be >= 16")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataResourcesConfig:
    """How the data pipeline spreads over the Ray cluster."""

    chunk_size: int = 1000
    """Source rows per download task (large chunks amortise img2dataset's start-up)."""
    cpus_per_chunk_task: float = 1.0
    """CPUs reserved by each download + filter + bucket task."""
    num_encoders: int = 1
    """Encoder actors (each holds the VAE, CLIP and Qwen2-VL's frozen prefix)."""
    cpus_per_encoder: float = 1.0
    """CPUs reserved by each encoder actor."""
    gpus_per_encoder: float = 0.0
    """GPUs reserved by each encoder actor (0 on CPU machines)."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.num_encoders < 1:
            raise ValueError("num_encoders must be >= 1")
        if self.cpus_per_chunk_task <= 0 or self.cpus_per_encoder <= 0:
            raise ValueError("cpus_per_chunk_task and cpus_per_encoder must be > 0")
        if self.gpus_per_encoder < 0:
            raise ValueError("gpus_per_encoder must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardConfig:
    """How encoded samples land in Parquet."""

    max_row_group_bytes: int = 256 * 1024 * 1024
    """Upper bound on a Parquet row group's size."""
    compression: str = "zstd"
    """Parquet compression codec for the shards."""

    def __post_init__(self) -> None:
        if self.max_row_group_bytes < 1024:
            raise ValueError("max_row_group_bytes must be >= 1024")
        if self.compression not in ("zstd", "snappy", "none", "lz4", "gzip"):
            raise ValueError(f"compression {self.compression!r} is not a Parquet codec")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Everything the data pipeline needs, one section per step."""

    source: SourceConfig
    url_policy: UrlPolicyConfig
    download: DownloadConfig
    filters: FilterConfig
    buckets: BucketConfig
    encode: EncodeConfig
    shards: ShardConfig
    resources: DataResourcesConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """The whole config of one run: a preset file plus overrides."""

    run: RunConfig
    data: DataConfig


def preset_path(name_or_path: str) -> Path:
    """A preset name (`tiny`) or a path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        return candidate
    return CONFIG_DIR / f"{name_or_path}.toml"


def load_config(name_or_path: str, overrides: tuple[str, ...] | list[str] = ()) -> PipelineConfig:
    """Load a preset strictly and apply `section.key=value` overrides."""
    table = load_toml(preset_path(name_or_path))
    for assignment in overrides:
        apply_override(table, PipelineConfig, assignment)
    return build(PipelineConfig, table)


def all_presets() -> list[Path]:
    """Every shipped preset file."""
    return sorted(CONFIG_DIR.glob("*.toml"))


__all__ = ["ConfigError", "PipelineConfig", "all_presets", "load_config", "preset_path"]
