"""The pipeline config tree and its presets (`pipelines/configs/*.toml`).

`PipelineConfig` holds one section per concern; each component's own config class lives in the
component's module and is composed here. `load_config(path, overrides)` is the only entry point
the CLI uses; `--set section.key=value` overrides are parsed against the field's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.data.buckets import BucketConfig
from components.data.captioning import CaptioningConfig
from components.data.download import DownloadConfig
from components.data.encode import EncodeConfig
from components.data.filters import FilterConfig
from components.data.url_policy import UrlPolicyConfig
from components.evaluation.conditioning_check import ConditioningCheckConfig
from components.inference.request_rows import RequestDefaults
from components.training.loop_config import EmaConfig
from components.training.objective import ObjectiveConfig
from components.training.optimizer import GuardConfig, OptimizerConfig
from components.training.stages import StageConfig
from model.conditioning import TEXT_BRANCHES
from pipelines.config_loading import ConfigError, apply_override, build, load_toml
from pipelines.source_config import DataSourceConfig, SyntheticCorpusConfig, check_sources

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
        if "://" in self.root:
            raise ValueError(
                f"root must be a local path or a shared mount, not {self.root!r}; object storage "
                "goes in train.storage_path (checkpoints) and tracking.artifact_location"
            )
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ValueError("local_num_cpus must be >= 1")


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

    max_row_group_bytes: int = 32 * 1024 * 1024
    """Upper bound on a Parquet row group's size (the contract allows up to 256 MiB). Training
    reads whole row groups for randomly drawn rows, so smaller groups waste less I/O."""
    compression: str = "zstd"
    """Parquet compression codec for the shards."""

    def __post_init__(self) -> None:
        if not 1024 <= self.max_row_group_bytes <= 256 * 1024 * 1024:
            raise ValueError("max_row_group_bytes must lie in [1 KiB, 256 MiB]")
        if self.compression not in ("zstd", "snappy", "none", "lz4", "gzip"):
            raise ValueError(f"compression {self.compression!r} is not a Parquet codec")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Everything the data pipeline needs, one section per step."""

    sources: tuple[DataSourceConfig, ...]
    """The dataset's sources (`[[data.sources]]`), each with a name, kind and weight."""
    synthetic: SyntheticCorpusConfig
    url_policy: UrlPolicyConfig
    download: DownloadConfig
    filters: FilterConfig
    buckets: BucketConfig
    encode: EncodeConfig
    captioning: CaptioningConfig
    shards: ShardConfig
    resources: DataResourcesConfig

    def __post_init__(self) -> None:
        check_sources(self.sources)

    def source(self, name: str) -> DataSourceConfig:
        """The source called `name`."""
        return next(source for source in self.sources if source.name == name)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainResourcesConfig:
    """How training spreads over Ray Train workers."""

    num_workers: int = 1
    """Ray Train workers (one per GPU on a cluster)."""
    cpus_per_worker: float = 1.0
    """CPUs per worker; fractional on small machines so data tasks keep a core."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 = CPU training)."""
    strategy: str = "ddp"
    """Parallelism: "ddp" (every worker holds the whole model; gradients all-reduced) or
    "fsdp" (FSDP2 per FLUX block: weights, gradients and AdamW states sharded over workers)."""
    mixed_precision: str = "auto"
    """"auto" = bf16 autocast on GPU, fp32 on CPU; or "bf16" / "fp32"."""
    gradient_checkpointing: bool = False
    """Recompute FLUX block activations in backward (needed at real scale)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("num_workers >= 1, cpus_per_worker > 0, gpus_per_worker >= 0")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy {self.strategy!r}: must be 'ddp' or 'fsdp'")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError("mixed_precision must be auto, bf16 or fp32")

    def computes_in_bf16(self, *, on_gpu: bool) -> bool:
        """bf16 compute on GPU for "auto", wherever asked for "bf16"; plain fp32 otherwise.
        Master weights, gradients and AdamW states stay fp32 either way."""
        return self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and on_gpu)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """The three-stage fine-tune."""

    dataset: str = ""
    """Dataset root (holds manifest.json); empty = <run.root>/data."""
    storage_path: str = ""
    """Ray Train storage for checkpoints (local dir or s3://); empty = <run.root>/train."""
    init_from: str = ""
    """Start from a model package instead of the bases: a package folder, models:/NAME/VERSION
    or models:/NAME@ALIAS (resolved when the training starts). Its transformer, Qwen2-VL tail
    and connector are the starting weights; the dataset must have been encoded by the same
    frozen Qwen2-VL prefix (checked by hash). Empty = the bases and a fresh connector."""
    text_branch: str = "qwen2vl"
    """How captions condition FLUX: "qwen2vl" (the caption prompt through Qwen2-VL's last layer
    and the connector) or "t5", the released model's branch (the caption's cached T5 states,
    data.encode.t5_caption, through a trained t5_embedder; the init package's when it has one).
    The package the training exports reads prompts the same way."""
    micro_batch_size: int = 1
    """Samples per worker per forward/backward."""
    accumulation_steps: int = 1
    """Micro-batches per worker per optimizer step."""
    checkpoint_every_steps: int = 10
    """Optimizer steps between checkpoints (and at each stage's end)."""
    validate_every_steps: int = 10
    """Optimizer steps between validation losses (and at each stage's end)."""
    num_validation_samples: int = 4
    """Held-out samples (kept out of training) for validation loss and the image grid."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting at the last checkpoint)."""
    async_checkpoints: bool = False
    """Write checkpoints in the background: each worker copies its shards to host memory and
    training goes on while they are written; a checkpoint is registered once every worker's
    write is done."""
    resources: TrainResourcesConfig
    ema: EmaConfig
    """[train.ema]: an exponential moving average of the trained weights (off by default)."""
    optimizer: OptimizerConfig
    objective: ObjectiveConfig
    guard: GuardConfig
    stages: tuple[StageConfig, ...]

    def __post_init__(self) -> None:
        for name in (
            "micro_batch_size",
            "accumulation_steps",
            "checkpoint_every_steps",
            "validate_every_steps",
            "num_validation_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.stages or len({stage.name for stage in self.stages}) != len(self.stages):
            raise ValueError("stages must be a non-empty list with distinct names")
        if self.text_branch not in TEXT_BRANCHES:
            raise ValueError(f"text_branch must be one of {list(TEXT_BRANCHES)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackingConfig:
    """Where runs, metrics, artifacts and registered models go."""

    tracking_uri: str = ""
    """MLflow tracking URI; empty = SQLite file <run.root>/mlflow.db."""
    artifact_location: str = ""
    """Artifact root for new experiments; empty = <run.root>/mlartifacts."""
    experiment_name: str = "train"
    """MLflow experiment of training runs."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryConfig:
    """The evaluation gate and the registered model."""

    model_name: str = "qwen2vl-flux"
    """Registered model name in the MLflow Model Registry."""
    min_improvement: float = 0.02
    """Gate: the trained model's held-out validation loss must be at least this fraction below
    the untrained start's (same rows, same fixed sigmas and noise)."""
    weights: str = "raw"
    """Which weights of the final checkpoint the package carries (and the gate judges): "raw"
    or "ema" (needs train.ema.decay)."""
    conditioning: ConditioningCheckConfig
    """Gate: generations must land in the class their conditioning names ([registry.conditioning];
    no checks unless `modes` names some)."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if not 0.0 <= self.min_improvement < 1.0:
            raise ValueError("min_improvement must lie in [0, 1)")
        if self.weights not in ("raw", "ema"):
            raise ValueError(f'weights must be "raw" or "ema", got {self.weights!r}')


@dataclass(frozen=True, kw_only=True, slots=True)
class InferConfig:
    """Batch inference: the actor pool and the request defaults."""

    num_actors: int = 1
    """Ray Data actors; each loads the model once."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""
    gpus_per_actor: float = 0.0
    """GPUs per actor (0 = CPU)."""
    batch_size: int = 4
    """Requests per actor call (results are written as each call returns)."""
    device: str = "cpu"
    """Torch device of the actors ("cuda" with gpus_per_actor > 0)."""
    compute_dtype: str = "float32"
    """Dtype of generation ("bfloat16" on GPU)."""
    controlnet: str = ""
    """FLUX ControlNet (diffusers FluxControlNetModel layout; local folder or hub id in the HF
    cache) for `control` requests; empty = such requests fail with a per-row "control" error."""
    depth_detector: str = ""
    """Depth estimator (transformers AutoModelForDepthEstimation layout) for 'depth' controls
    given as source pictures; empty = only preprocessed depth maps are accepted."""
    requests_file: str = ""
    """Requests file (Parquet or JSONL) batch inference generates in `qwenflux run all`, on the
    champion; empty = the workflow has no inference step."""
    requests: RequestDefaults

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("num_actors and batch_size must be >= 1")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError("compute_dtype must be float32, bfloat16 or float16")


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanConfig:
    """What `qwenflux plan` assumes beyond what the run trains (defaults: A100-80GB, bf16).

    "Device" is what one Ray Train worker trains on: a GPU, or with gpus_per_worker = 0 the
    worker's share of the host."""

    mfu: float = 0.35
    """Model FLOPs utilisation assumed for step time and days (model FLOPs exclude recompute)."""
    device_peak_tflops: float = 312.0
    """Dense peak TFLOP/s of one device at the compute precision trained (A100: 312 bf16)."""
    device_memory_gib: float = 80.0
    """Memory of one device the fit verdict compares against (A100-80GB: 80 GiB)."""
    overhead_gib: float = 4.0
    """Per device: CUDA context, NCCL buffers, allocator fragmentation, transient buffers."""
    image_prompt_extra_tokens: int = 26
    """Tokens of the reference-image chat turn besides its image tokens (template, vision
    markers, instruction); the Qwen2-VL layer replays them with the image tokens."""
    caption_prompt_tokens: int = 96
    """Tokens of the caption chat turn (template + caption), the longest in a micro-batch (the
    trainer pads to it); the Qwen2-VL layer replays it every step, FLUX sees it per the
    objective's caption probabilities."""

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must lie in (0, 1], got {self.mfu}")
        if self.device_peak_tflops <= 0 or self.device_memory_gib <= 0:
            raise ValueError("device_peak_tflops and device_memory_gib must be > 0")
        if self.overhead_gib < 0:
            raise ValueError(f"overhead_gib must be >= 0, got {self.overhead_gib}")
        if self.image_prompt_extra_tokens < 0 or self.caption_prompt_tokens < 0:
            raise ValueError("image_prompt_extra_tokens and caption_prompt_tokens must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """The whole config of one run: a preset file plus overrides."""

    run: RunConfig
    data: DataConfig
    train: TrainConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    infer: InferConfig
    plan: PlanConfig
    """Assumptions of `qwenflux plan` ([plan]); training ignores them."""

    def __post_init__(self) -> None:
        # One caption length for training and inference: a model never sees longer prompts.
        trained, served = self.data.encode.max_caption_tokens, self.infer.requests.max_prompt_tokens
        if trained != served:
            raise ValueError(
                f"data.encode.max_caption_tokens ({trained}) and infer.requests.max_prompt_tokens "
                f"({served}) must be equal: inference caps prompts where training capped captions"
            )
        if self.registry.weights == "ema" and not self.train.ema.enabled:
            raise ValueError(
                'registry.weights = "ema" needs train.ema.decay: the training keeps no EMA'
            )


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
