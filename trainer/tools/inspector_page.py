"""Rendering of inspected hard pairs: a self-contained HTML page and a PNG grid (the shell of `helip-inspect`).

Both take a list of `AnchorPairs` (tools.inspector) and `image_of(id) -> PIL image`, so they can be fed a small
hand-made set in tests. The page needs no JavaScript; its structure is stable so that tools can read it:

    <section class="anchor" data-id=ID data-step=STEP>          one per anchor, in the order given
      <figure class="sample anchor-sample">...</figure>          the anchor's image and caption
      <ol class="pairs">
        <li class="pair [false-negative]" data-id data-rank data-step data-score data-image-sim data-text-sim>

Images are inlined as base64 PNG data URIs (thumbnails), so the page is one file that can be mailed or archived.
The PNG grid has one row per anchor: the anchor in column 0, its pairs in columns 1..k; flagged pairs get a red
frame. Its size is `GridLayout.size(rows, columns)` exactly.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from helip.trainer.tools.inspector import AnchorPairs, FalseNegativeRule

ImageOf = Callable[[int], Image.Image]

BACKGROUND = (255, 255, 255)
FLAG_COLOUR = (200, 30, 30)
TEXT_COLOUR = (20, 20, 20)
MUTED_COLOUR = (110, 110, 110)


def thumbnail(image: Image.Image, side: int) -> Image.Image:
    """`image` fitted into a side x side RGB square, aspect kept; small images scale up without blurring."""
    image = image.convert("RGB")
    grows = max(image.size) < side
    return ImageOps.pad(image, (side, side), Image.Resampling.NEAREST if grows else Image.Resampling.LANCZOS)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
header p { color: #555; max-width: 60em; }
section.anchor { display: flex; gap: 1em; align-items: flex-start; padding: 1em 0; border-top: 1px solid #ddd; }
figure { margin: 0; width: 11em; }
figure img { width: 100%; image-rendering: pixelated; border: 3px solid transparent; background: #eee; }
figure.anchor-sample img { border-color: #2a6fdb; }
ol.pairs { display: flex; gap: 0.8em; list-style: none; padding: 0; margin: 0; flex-wrap: wrap; }
li.pair figure { width: 10em; }
li.pair.false-negative img { border-color: #c81e1e; }
.caption { font-size: 0.9em; margin: 0.3em 0; }
dl.scores { display: grid; grid-template-columns: auto auto; gap: 0 0.5em; font-size: 0.8em; margin: 0; }
dl.scores dt { color: #666; }
dl.scores dd { margin: 0; font-variant-numeric: tabular-nums; }
.flag { color: #c81e1e; font-size: 0.8em; margin: 0.3em 0 0; }
.meta { font-size: 0.8em; color: #555; margin: 0.2em 0 0; }
.missing { color: #c81e1e; }
"""


def _figure(css_class: str, image_src: str, alt: str, caption: str, details: str) -> str:
    return (
        f'<figure class="{css_class}"><img src="{image_src}" alt="{html.escape(alt)}">'
        f'<figcaption><p class="caption">{html.escape(caption)}</p>{details}</figcaption></figure>'
    )


def _scores_list(rows: Sequence[tuple[str, str]]) -> str:
    return '<dl class="scores">' + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows) + "</dl>"


def render_html(
    anchors: Sequence[AnchorPairs],
    image_of: ImageOf,
    *,
    title: str = "helip hard pairs",
    source: str = "",
    rule: FalseNegativeRule | None = None,
    thumb_px: int = 96,
) -> str:
    """The whole page as a string (UTF-8; captions and every attribute value escaped)."""
    rule = rule or FalseNegativeRule()
    uris: dict[int, str] = {}

    def uri(sample_id: int) -> str:  # an id that is an anchor and another anchor's pair is encoded once
        if sample_id not in uris:
            uris[sample_id] = data_uri(thumbnail(image_of(sample_id), thumb_px))
        return uris[sample_id]

    flagged = sum(pair.likely_false_negative for anchor in anchors for pair in anchor.pairs)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(source)}</p>" if source else "",
        f"<p>{len(anchors)} anchors; {flagged} pairs marked as likely false negatives (red): "
        f"{html.escape(rule.describe())}</p></header>",
    ]
    for anchor in anchors:
        sample = anchor.anchor
        parts.append(f'<section class="anchor" data-id="{sample.id}" data-step="{sample.step}">')
        details = f'<p class="meta">anchor {sample.id} &middot; step {sample.step}</p>'
        if not anchor.stored:
            details += '<p class="missing">not in the index: no pairs</p>'
        parts.append(_figure("sample anchor-sample", uri(sample.id), f"anchor {sample.id}", sample.caption, details))
        parts.append('<ol class="pairs">')
        for rank, pair in enumerate(anchor.pairs, start=1):
            css = "pair false-negative" if pair.likely_false_negative else "pair"
            parts.append(
                f'<li class="{css}" data-id="{pair.id}" data-rank="{rank}" data-step="{pair.step}" '
                f'data-score="{pair.score:.6f}" data-image-sim="{pair.image_sim:.6f}" '
                f'data-text-sim="{pair.text_sim:.6f}">'
            )
            scores = _scores_list(
                [
                    ("score", f"{pair.score:.3f}"),
                    ("image", f"{pair.image_sim:.3f}"),
                    ("text", f"{pair.text_sim:.3f}"),
                    ("id", str(pair.id)),
                    ("step", str(pair.step)),
                ]
            )
            if pair.likely_false_negative:
                scores += f'<p class="flag">likely false negative: {html.escape("; ".join(pair.flags))}</p>'
            parts.append(_figure("sample", uri(pair.id), f"pair {rank} of anchor {sample.id}", pair.caption, scores))
            parts.append("</li>")
        parts.append("</ol></section>")
    parts.append("</body></html>\n")
    return "\n".join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------------------------
# PNG grid


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of the grid: every cell is `cell_width` x `cell_height`, with no outer margin."""

    thumb_px: int = 96
    padding_px: int = 6
    text_lines: int = 4
    line_px: int = 12

    def __post_init__(self):
        for name in ("thumb_px", "line_px"):
            if getattr(self, name) < 1:
                raise ValueError(f"GridLayout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("padding_px", "text_lines"):
            if getattr(self, name) < 0:
                raise ValueError(f"GridLayout.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def cell_width(self) -> int:
        return self.thumb_px + 2 * self.padding_px

    @property
    def cell_height(self) -> int:
        return self.thumb_px + 2 * self.padding_px + self.text_lines * self.line_px

    def size(self, rows: int, columns: int) -> tuple[int, int]:
        """(width, height) in pixels of a grid of rows x columns cells."""
        return columns * self.cell_width, rows * self.cell_height


def _font(line_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(8, line_px - 2))
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _fit(text: str, font, width_px: int) -> str:
    """`text`, cut and ended with an ellipsis where it is wider than `width_px`."""
    if font.getlength(text) <= width_px:
        return text
    while text and font.getlength(text + "…") > width_px:
        text = text[:-1]
    return text + "…"


def _cell_lines(caption: str, details: str, font, layout: GridLayout) -> list[str]:
    """The caption wrapped to the thumbnail's width (cut to the lines left) and one line of details below."""
    if layout.text_lines == 0:
        return []
    width = layout.thumb_px
    lines: list[str] = []
    for word in caption.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    room = layout.text_lines - 1
    if len(lines) > room:
        lines = lines[:room]
        if lines:
            lines[-1] += " …"
    return [_fit(line, font, width) for line in [*lines, details]]


def render_grid(anchors: Sequence[AnchorPairs], image_of: ImageOf, k: int, layout: GridLayout = GridLayout()):
    """An RGB PIL image of len(anchors) rows x (1 + k) columns; a row with fewer than k pairs leaves blank cells."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    grid = Image.new("RGB", layout.size(len(anchors), 1 + k), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font(layout.line_px)
    pad, side = layout.padding_px, layout.thumb_px

    def cell(row: int, column: int, sample_id: int, caption: str, details: str, frame: tuple | None) -> None:
        x, y = column * layout.cell_width, row * layout.cell_height
        grid.paste(thumbnail(image_of(sample_id), side), (x + pad, y + pad))
        if frame is not None:
            width = max(1, pad // 2)
            draw.rectangle(
                [x + pad - width, y + pad - width, x + pad + side + width - 1, y + pad + side + width - 1],
                outline=frame,
                width=width,
            )
        lines = _cell_lines(caption, details, font, layout)
        for line_index, line in enumerate(lines):
            # The details line takes the frame's colour: a flagged pair's scores are red as well as its frame.
            colour = (frame or MUTED_COLOUR) if line_index == len(lines) - 1 else TEXT_COLOUR
            draw.text((x + pad, y + 2 * pad + side + line_index * layout.line_px), line, fill=colour, font=font)

    for row, anchor in enumerate(anchors):
        sample = anchor.anchor
        cell(row, 0, sample.id, sample.caption, f"anchor {sample.id} s{sample.step}", (42, 111, 219))
        for column, pair in enumerate(anchor.pairs[:k], start=1):
            details = f"{pair.score:.2f} i{pair.image_sim:.2f} t{pair.text_sim:.2f}"
            cell(row, column, pair.id, pair.caption, details, FLAG_COLOUR if pair.likely_false_negative else None)
    return grid
