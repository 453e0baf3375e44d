"""Strict config loading: unknown keys, types, overrides, optional fields."""

from dataclasses import dataclass

import pytest

from pipelines.config_loading import ConfigError, apply_override, build, config_hash, flatten

pytestmark = pytest.mark.unit


@dataclass(frozen=True, kw_only=True, slots=True)
class Inner:
    count: int
    rate: float = 0.5
    names: tuple[str, ...] = ("a",)
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class Outer:
    label: str
    flag: bool = False
    inner: Inner


def test_builds_nested_with_defaults_and_int_to_float():
    config = build(Outer, {"label": "x", "inner": {"count": 3, "rate": 1, "names": ["p", "q"]}})
    assert config.inner == Inner(count=3, rate=1.0, names=("p", "q"))
    assert isinstance(config.inner.rate, float)


def test_unknown_key_is_named_with_its_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.cuont'"):
        build(Outer, {"label": "x", "inner": {"count": 1, "cuont": 2}})


def test_missing_required_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"missing required config key 'inner\.count'"):
        build(Outer, {"label": "x", "inner": {}})
    with pytest.raises(ConfigError, match=r"'inner\.count' expects int, got str"):
        build(Outer, {"label": "x", "inner": {"count": "3"}})
    with pytest.raises(ConfigError, match=r"'flag' expects bool"):
        build(Outer, {"label": "x", "flag": 1, "inner": {"count": 3}})


def test_validation_error_names_the_section():
    with pytest.raises(ConfigError, match=r"\[inner\] count must be >= 0"):
        build(Outer, {"label": "x", "inner": {"count": -1}})


def test_overrides_parse_against_field_types():
    table = {"label": "x", "inner": {"count": 1, "limit": 4}}
    for assignment in (
        "inner.count=7",
        "inner.rate=2e-5",
        "flag=true",
        "inner.names=a,b",
        "inner.limit=none",
        "label=hello world",
    ):
        apply_override(table, Outer, assignment)
    config = build(Outer, table)
    assert config == Outer(
        label="hello world",
        flag=True,
        inner=Inner(count=7, rate=2e-5, names=("a", "b"), limit=None),
    )


def test_override_of_unknown_key_or_bad_value_fails():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.nope'"):
        apply_override({}, Outer, "inner.nope=1")
    with pytest.raises(ConfigError, match="not a valid int"):
        apply_override({}, Outer, "inner.count=seven")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, Outer, "inner.count")


def test_hash_and_flatten_follow_values():
    first = build(Outer, {"label": "x", "inner": {"count": 1}})
    second = build(Outer, {"label": "x", "inner": {"count": 2}})
    assert config_hash(first) != config_hash(second)
    assert config_hash(first) == config_hash(build(Outer, {"label": "x", "inner": {"count": 1}}))
    assert flatten(first)["inner.count"] == 1


@dataclass(frozen=True, kw_only=True, slots=True)
class Stage:
    name: str
    num_steps: int = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class Training:
    stages: tuple[Stage, ...]


def test_lists_of_sections_load_and_override_by_position():
    table = {"stages": [{"name": "a"}, {"name": "b", "num_steps": 3}]}
    apply_override(table, Training, "stages.2.num_steps=7")
    assert build(Training, table).stages == (Stage(name="a"), Stage(name="b", num_steps=7))
    with pytest.raises(ConfigError, match=r"unknown config key 'stages\.1\.nmu_steps'"):
        build(Training, {"stages": [{"name": "a", "nmu_steps": 1}]})
    with pytest.raises(ConfigError, match=r"stages\.3 does not exist"):
        apply_override(table, Training, "stages.3.num_steps=1")
    with pytest.raises(ConfigError, match=r"address items as stages\.<n>"):
        apply_override(table, Training, "stages.num_steps=1")


def test_a_run_root_on_object_storage_is_refused_with_where_object_storage_goes():
    from pipelines.config import load_config

    with pytest.raises(
        ConfigError, match=r"\[run\] root must be a local path.*train\.storage_path"
    ):
        load_config("tiny", ["run.root=s3://bucket/runs/tiny"])
