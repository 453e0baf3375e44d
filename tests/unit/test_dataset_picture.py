"""Contact sheets and count charts: sizes and layout, determinism to the byte, captions kept
inside their tile, bars scaled per section, empty sections."""

import io

import pytest
from PIL import Image

from components.data import dataset_picture
from components.data.dataset_picture import (
    BAR,
    CAPTION_LINES,
    CHART_BAR_PX,
    ELLIPSIS,
    GAP_PX,
    MARGIN_PX,
    contact_sheet,
    count_chart,
    fit_text,
    wrap_text,
)

pytestmark = pytest.mark.unit

RED = (200, 30, 30)
LONG_CAPTION = "a very long caption about a red square " * 40


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tiles(count: int, *, size=(128, 64), caption="a red square") -> list:
    return [(Image.new("RGB", size, RED), caption) for _ in range(count)]


def test_sheet_is_columns_wide_and_grows_by_rows():
    one_row = contact_sheet(_tiles(3), title="bucket 128x64", columns=4, tile_px=64)
    two_rows = contact_sheet(_tiles(5), title="bucket 128x64", columns=4, tile_px=64)
    assert one_row.width == two_rows.width == 2 * MARGIN_PX + 4 * 64 + 3 * GAP_PX
    assert two_rows.height > one_row.height
    assert one_row.mode == "RGB"


def test_sheet_with_no_tiles_is_its_title():
    empty = contact_sheet([], title="bucket 128x64: fitted images missing", tile_px=64)
    with_one = contact_sheet(_tiles(1), title="bucket 128x64: fitted images missing", tile_px=64)
    assert empty.height < with_one.height
    assert empty.width == with_one.width
    taller = contact_sheet([], title="line one\nline two", tile_px=64)
    assert taller.height > empty.height


def test_image_fits_its_tile_with_aspect_kept_and_centred():
    tile_px = 64
    sheet = contact_sheet(_tiles(1, size=(128, 64)), title="t", columns=1, tile_px=tile_px)
    top = MARGIN_PX + dataset_picture._line_height(dataset_picture._font()) + GAP_PX
    red_rows = [
        y for y in range(top, top + tile_px) if sheet.getpixel((MARGIN_PX + tile_px // 2, y)) == RED
    ]
    # 128x64 scaled into a 64 box is 64x32, centred vertically in the tile.
    assert len(red_rows) == 32
    assert red_rows[0] == top + 16
    assert sheet.getpixel((MARGIN_PX, top + 16)) == RED
    assert sheet.getpixel((MARGIN_PX + tile_px - 1, top + 47)) == RED


def test_same_inputs_give_identical_bytes():
    tiles = _tiles(6, caption=LONG_CAPTION)
    first = contact_sheet(tiles, title="bucket 128x64 (2:1): 29 samples", tile_px=96)
    second = contact_sheet(tiles, title="bucket 128x64 (2:1): 29 samples", tile_px=96)
    assert _png(first) == _png(second)
    sections = {"rejected": {"filter/too_small": 8}, "per bucket": {"128x64": 29, "64x128": 16}}
    assert _png(count_chart(sections, title="v1")) == _png(count_chart(sections, title="v1"))


def test_long_caption_stays_inside_its_tile():
    tile_px = 64
    font = dataset_picture._font()
    lines = wrap_text(LONG_CAPTION, width_px=tile_px, max_lines=CAPTION_LINES)
    assert len(lines) == CAPTION_LINES
    assert lines[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= tile_px for line in lines)
    unbroken = wrap_text("x" * 400, width_px=tile_px, max_lines=CAPTION_LINES)
    assert len(unbroken) == CAPTION_LINES and unbroken[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= tile_px for line in unbroken)

    short = contact_sheet(_tiles(1), title="t", columns=2, tile_px=tile_px)
    long = contact_sheet(_tiles(1, caption=LONG_CAPTION), title="t", columns=2, tile_px=tile_px)
    assert long.size == short.size
    # Everything right of the first tile (gap and empty second cell) stays background.
    right = long.crop((MARGIN_PX + tile_px, 0, long.width, long.height))
    assert right.getcolors() == [(right.width * right.height, dataset_picture.BACKGROUND)]


def test_short_caption_is_not_cut():
    assert wrap_text("a red square", width_px=256, max_lines=3) == ["a red square"]
    assert wrap_text("", width_px=256, max_lines=3) == []
    assert fit_text("short", width_px=256) == "short"
    cut = fit_text("a title far too long " * 20, width_px=100)
    assert cut.endswith(ELLIPSIS)
    assert dataset_picture._font().getlength(cut) <= 100


def _bar_lengths(chart: Image.Image) -> list[int]:
    """Lengths of the bars, top to bottom (one per bar: its first row of bar colour)."""
    lengths, previous = [], 0
    for y in range(chart.height):
        run = sum(1 for x in range(chart.width) if chart.getpixel((x, y)) == BAR)
        if run and not previous:
            lengths.append(run)
        previous = run
    return lengths


def test_bars_are_scaled_per_section():
    chart = count_chart(
        {"small": {"a": 5, "b": 10}, "large": {"c": 1000}, "zero": {"d": 0}}, title="counts"
    )
    assert _bar_lengths(chart) == [CHART_BAR_PX // 2, CHART_BAR_PX, CHART_BAR_PX]


def test_empty_sections_are_drawn():
    with_empty = count_chart({"rejected": {}, "per bucket": {"128x64": 3}}, title="v1")
    without = count_chart({"per bucket": {"128x64": 3}}, title="v1")
    assert with_empty.height > without.height
    assert _bar_lengths(with_empty) == [CHART_BAR_PX]
    nothing = count_chart({}, title="v1")
    assert nothing.height < without.height


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="columns"):
        contact_sheet([], title="t", columns=0)
    with pytest.raises(ValueError, match="tile_px"):
        contact_sheet([], title="t", tile_px=4)
    with pytest.raises(ValueError, match="'rejected'"):
        count_chart({"rejected": {"x": -1}}, title="t")
