"""Pictures of a dataset: a contact sheet of samples and a bar chart of counts (PIL only).

Used by pipelines/data_inspect.py after the data pipeline. Inputs are plain values: for a
contact sheet, (RGB image, caption) pairs, the images already fitted to their bucket exactly as
training sees them; for a chart, named sections of {label: count}. Outputs are RGB
`PIL.Image.Image`s. Everything is drawn with PIL's default font (`ImageFont.load_default()`),
so the same inputs give the same pixels, and a PNG of them the same bytes.

Contact sheet layout: a title block (lines of `title`), then a grid of `columns` cells; each cell
is a `tile_px` square holding the image scaled to fit (aspect kept, never cropped), with the
caption wrapped under it in at most `CAPTION_LINES` lines (the last ends in "..." when cut).
Chart layout: the title, then per section a heading and one bar per label, bars scaled to the
section's largest count, each labelled with its name (left) and count (right).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

CAPTION_LINES = 3
"""Caption lines under a tile; a longer caption is cut with "..."."""
MARGIN_PX = 10
GAP_PX = 8
ELLIPSIS = "..."
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (232, 232, 232)
TEXT = (20, 20, 20)
MUTED_TEXT = (110, 110, 110)
BAR = (70, 110, 170)
CHART_BAR_PX = 360
"""Length of a section's longest bar."""
CHART_LABEL_MAX_PX = 300
"""Bar labels wider than this are cut with "..."."""

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.cache
def _font() -> Font:
    return ImageFont.load_default()


def _line_height(font: Font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom) + 3


def _text_width(text: str, *, font: Font) -> float:
    return font.getlength(text)


def fit_text(text: str, *, width_px: int, font: Font | None = None) -> str:
    """`text` as one line no wider than width_px, cut with "..." when it is wider."""
    font = font or _font()
    if _text_width(text, font=font) <= width_px:
        return text
    # Every glyph of the default font is at least a pixel wide, so the rest cannot fit.
    kept = text[:width_px]
    while kept and _text_width(kept.rstrip() + ELLIPSIS, font=font) > width_px:
        kept = kept[:-1]
    return kept.rstrip() + ELLIPSIS if kept else ""


def wrap_text(text: str, *, width_px: int, max_lines: int, font: Font | None = None) -> list[str]:
    """`text` wrapped at whitespace into at most max_lines lines no wider than width_px; a
    word wider than a line is split, and text left over is cut with "..." on the last line."""
    font = font or _font()
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font=font) <= width_px:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while _text_width(current, font=font) > width_px and len(lines) <= max_lines:
            split = _longest_prefix(current, width_px=width_px, font=font)
            lines.append(current[:split])
            current = current[split:]
        if len(lines) > max_lines:
            break
    if current:
        lines.append(current)
    if len(lines) <= max_lines:
        return lines
    # The next line did not fit after this one, so joining them always overflows and is cut.
    last = fit_text(f"{lines[max_lines - 1]} {lines[max_lines]}", width_px=width_px, font=font)
    return [*lines[: max_lines - 1], last]


def _longest_prefix(word: str, *, width_px: int, font: Font) -> int:
    size = 1
    while size < len(word) and _text_width(word[: size + 1], font=font) <= width_px:
        size += 1
    return size


def _scaled_to_box(image: Image.Image, *, box_px: int) -> Image.Image:
    scale = min(box_px / image.width, box_px / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Enlarging shows the training pixels as blocks rather than a smoothed guess at them.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def _draw_title(draw: ImageDraw.ImageDraw, *, title: str, width_px: int, font: Font) -> int:
    """Draw the title lines at the top; returns the y where the content below starts."""
    line_px = _line_height(font)
    y = MARGIN_PX
    for line in title.splitlines() or [""]:
        draw.text((MARGIN_PX, y), fit_text(line, width_px=width_px, font=font), TEXT, font=font)
        y += line_px
    return y + GAP_PX


def contact_sheet(
    tiles: Sequence[tuple[Image.Image, str]],
    *,
    title: str,
    columns: int = 4,
    tile_px: int = 256,
) -> Image.Image:
    """A grid of (image, caption) tiles under a title (one line per line of `title`).

    Every cell is tile_px wide; its image is scaled to fit a tile_px square, centred, aspect
    kept; its caption sits under it in at most CAPTION_LINES lines. The sheet is `columns` cells
    wide whatever the number of tiles, so sheets of one run line up.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if tile_px < 16:
        raise ValueError(f"tile_px must be >= 16, got {tile_px}")
    font = _font()
    line_px = _line_height(font)
    cell_height = tile_px + GAP_PX // 2 + CAPTION_LINES * line_px
    width = 2 * MARGIN_PX + columns * tile_px + (columns - 1) * GAP_PX
    title_lines = max(1, len(title.splitlines()))
    top = MARGIN_PX + title_lines * line_px + GAP_PX
    rows = math.ceil(len(tiles) / columns)
    height = top + rows * cell_height + max(0, rows - 1) * GAP_PX + MARGIN_PX
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_title(draw, title=title, width_px=width - 2 * MARGIN_PX, font=font)
    for index, (image, caption) in enumerate(tiles):
        row, column = divmod(index, columns)
        left = MARGIN_PX + column * (tile_px + GAP_PX)
        cell_top = top + row * (cell_height + GAP_PX)
        draw.rectangle(
            (left, cell_top, left + tile_px - 1, cell_top + tile_px - 1), TILE_BACKGROUND
        )
        shown = _scaled_to_box(image, box_px=tile_px)
        sheet.paste(
            shown,
            (left + (tile_px - shown.width) // 2, cell_top + (tile_px - shown.height) // 2),
        )
        text_top = cell_top + tile_px + GAP_PX // 2
        lines = wrap_text(caption, width_px=tile_px, max_lines=CAPTION_LINES, font=font)
        for number, line in enumerate(lines):
            draw.text((left, text_top + number * line_px), line, TEXT, font=font)
    return sheet


def count_chart(sections: Mapping[str, Mapping[str, int]], *, title: str) -> Image.Image:
    """Horizontal bars, one block per section ({label: count}, drawn in the given order).

    Bars are scaled to the largest count of their own section; a zero count draws no bar. An
    empty section shows "(none)". Negative counts are a ValueError naming the section.
    """
    for name, counts in sections.items():
        negative = [label for label, count in counts.items() if count < 0]
        if negative:
            raise ValueError(f"section {name!r}: negative counts for {negative}")
    font = _font()
    line_px = _line_height(font)
    labels = [label for counts in sections.values() for label in counts]
    label_px = min(
        CHART_LABEL_MAX_PX,
        max((math.ceil(_text_width(text, font=font)) for text in labels), default=0),
    )
    numbers = [str(count) for counts in sections.values() for count in counts.values()]
    number_px = max((math.ceil(_text_width(text, font=font)) for text in numbers), default=0)
    bar_left = MARGIN_PX + label_px + GAP_PX
    width = bar_left + CHART_BAR_PX + GAP_PX + number_px + MARGIN_PX
    title_lines = max(1, len(title.splitlines()))
    rows = sum(1 + max(1, len(counts)) for counts in sections.values())
    height = (
        MARGIN_PX
        + title_lines * line_px
        + GAP_PX
        + rows * line_px
        + len(sections) * GAP_PX
        + MARGIN_PX
    )
    chart = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    y = _draw_title(draw, title=title, width_px=width - 2 * MARGIN_PX, font=font)
    for name, counts in sections.items():
        draw.text((MARGIN_PX, y), fit_text(name, width_px=width - 2 * MARGIN_PX), TEXT, font=font)
        y += line_px
        if not counts:
            draw.text((MARGIN_PX, y), "(none)", MUTED_TEXT, font=font)
            y += line_px
        largest = max(counts.values(), default=0)
        for label, count in counts.items():
            draw.text((MARGIN_PX, y), fit_text(label, width_px=label_px), TEXT, font=font)
            bar_px = round(CHART_BAR_PX * count / largest) if largest else 0
            if bar_px:
                draw.rectangle((bar_left, y + 1, bar_left + bar_px - 1, y + line_px - 3), BAR)
            draw.text((bar_left + bar_px + GAP_PX // 2, y), str(count), TEXT, font=font)
            y += line_px
        y += GAP_PX
    return chart
