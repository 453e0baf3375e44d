"""Bad input: a corpus served on 127.0.0.1 with every kind of broken url, server and image.
The run finishes; every row is counted under the reason the corpus expects; kept rows are
encoded, and odd-but-valid images (CMYK, 16-bit, palette+alpha, GIF, EXIF) land in the right
bucket with their orientation applied."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import sources_override

from components.data import shard_format
from components.data.demo_corpus import write_url_list
from components.data.loopback_server import closed_port_url
from pipelines.data import run_data
from pipelines.data_layout import DataLayout
from tests.bad_input_corpus import write_bad_input_corpus
from tests.loopback_routes import RoutedLoopbackServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_models_dir, ray_local, make_tiny_config):
    folder = tmp_path_factory.mktemp("bad_corpus")
    with RoutedLoopbackServer(folder) as server:
        cases = write_bad_input_corpus(
            folder, server_base_url=server.base_url, closed_port_url=closed_port_url(), seed=3
        )
        write_url_list(cases, folder / "urls.jsonl")
        config = make_tiny_config(
            tmp_path_factory.mktemp("bad_run"),
            tiny_models_dir,
            sources_override({"name": "web", "kind": "url_list", "paths": [folder / "urls.jsonl"]}),
            "data.download.timeout_seconds=2",
            "data.filters.min_side_px=16",
            "data.resources.chunk_size=10",
        )
        summary = run_data(config, show_progress=False)
    return cases, config, summary


def _observed_reasons(root: Path) -> dict[str, str]:
    layout = DataLayout(root)
    reasons = {}
    for path in sorted(layout.work.glob("chunk-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            reasons[row["sample_key"]] = row["reason"]
    for row in pq.read_table(layout.duplicates).to_pylist():
        reasons[row["sample_key"]] = row["reason"]
    return reasons


def test_every_case_is_counted_under_its_expected_reason(bad_run):
    cases, config, summary = bad_run
    observed = _observed_reasons(Path(config.run.root))
    assert len(observed) == len(cases) >= 21
    mismatches = {
        case["case"]: (case["expected_reason"], observed[f"{index:09d}"])
        for index, case in enumerate(cases)
        if observed[f"{index:09d}"] != case["expected_reason"]
    }
    assert mismatches == {}
    counted = sum(sum(reasons.values()) for reasons in summary.rejected.values())
    assert counted + summary.encoded == summary.source_rows == len(cases)


def test_kept_odd_images_are_encoded_in_their_buckets(bad_run):
    cases, config, _ = bad_run
    stored = {}
    for path in shard_format.list_shards(Path(config.run.root) / "data"):
        table = pq.read_table(
            path, columns=["sample_key", "bucket_id", "source_width_px", "source_height_px"]
        )
        for row in table.to_pylist():
            stored[row["sample_key"]] = row
    kept = {
        f"{i:09d}": case["case"]
        for i, case in enumerate(cases)
        if case["expected_reason"] == "kept"
    }
    assert set(stored) == set(kept)
    by_case = {kept[key]: row for key, row in stored.items()}
    rotated = by_case["exif_rotated_jpeg"]
    assert rotated["source_height_px"] > rotated["source_width_px"], "EXIF rotation not applied"
    assert {"cmyk_jpeg", "png_16_bit", "palette_alpha_png", "animated_gif"} <= set(by_case)
