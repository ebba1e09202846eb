"""Rendering of inspected hard pairs: a self-contained HTML page and a PNG grid (the shell of `helip-inspect`).

Both take a list of `AnchorPairs` (tools.inspector) and `image_of(id) -> PIL image`, so they can be fed a small
hand-made set in tests. The page needs no JavaScript; its structure is stable so that tools can read it:

    <p class="guard-summary" data-ratio data-shown data-dropped data-flagged>   with a guard ratio
    <table class="guard-ratios">                                  with ratios to compare: one row each
    <section class="anchor" data-id=ID data-step=STEP [data-positive]>   one per anchor, in the order given
      <figure class="sample anchor-sample">...</figure>          the anchor's image and caption
      <ol class="pairs">
        <li class="pair [false-negative] [guard-drop]" data-id data-rank data-step data-score data-image-sim
            data-text-sim [data-image-text data-text-image data-caption-fit] [data-guard-drop="true|false"]>
      </ol>
      <div class="guarded" data-ratio data-ids>                 with a guard ratio: the ids a guarded Mine returns
        <ol class="guarded-pairs"><li class="guarded-pair" data-id data-score data-caption-fit>   those not above

The cross-term attributes are there when the pairs carry them (tools.inspector.assemble computes them), the guard
ones when the anchors were inspected at a guard ratio (AnchorPairs.guard_ratio). Images are inlined as base64 PNG
data URIs (thumbnails), so the page is one file that can be mailed or archived.
The PNG grid has one row per anchor: the anchor in column 0, its pairs in columns 1..k; flagged pairs get a red
frame, pairs the guard drops a dashed orange one around it and an orange "fit" line. Its size is
`GridLayout.size(rows, columns)` exactly.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from helip.trainer.tools.inspector import AnchorPairs, FalseNegativeRule, HardPair, guard_counts

ImageOf = Callable[[int], Image.Image]

BACKGROUND = (255, 255, 255)
FLAG_COLOUR = (200, 30, 30)
GUARD_COLOUR = (224, 123, 0)
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
section.anchor { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; padding: 1em 0;
                 border-top: 1px solid #ddd; }
figure { margin: 0; width: 11em; }
figure img { width: 100%; image-rendering: pixelated; border: 3px solid transparent; background: #eee; }
figure.anchor-sample img { border-color: #2a6fdb; }
ol.pairs { display: flex; gap: 0.8em; list-style: none; padding: 0; margin: 0; flex-wrap: wrap; }
li.pair figure { width: 10em; }
li.pair.false-negative img { border-color: #c81e1e; }
li.pair.guard-drop > figure { outline: 3px dashed #e07b00; outline-offset: 3px; }
.caption { font-size: 0.9em; margin: 0.3em 0; }
dl.scores { display: grid; grid-template-columns: auto auto; gap: 0 0.5em; font-size: 0.8em; margin: 0; }
dl.scores dt { color: #666; }
dl.scores dd { margin: 0; font-variant-numeric: tabular-nums; }
.flag { color: #c81e1e; font-size: 0.8em; margin: 0.3em 0 0; }
.guard { color: #b35f00; font-size: 0.8em; margin: 0.3em 0 0; }
.guard-summary { color: #b35f00; }
table.guard-ratios { border-collapse: collapse; font-size: 0.9em; font-variant-numeric: tabular-nums; }
table.guard-ratios th, table.guard-ratios td { padding: 0.1em 0.8em; text-align: right; border-bottom: 1px solid #ddd; }
div.guarded { flex-basis: 100%; margin-left: 12em; font-size: 0.85em; color: #555; }
div.guarded p { margin: 0 0 0.3em; }
ol.guarded-pairs { display: flex; gap: 0.6em; list-style: none; padding: 0; margin: 0; flex-wrap: wrap; }
li.guarded-pair figure { width: 6em; }
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


def guard_ratio_of(anchors: Sequence[AnchorPairs]) -> float:
    """The guard ratio the anchors were inspected at (0: none); one for all of them."""
    ratios = {anchor.guard_ratio for anchor in anchors}
    if len(ratios) > 1:
        raise ValueError(f"anchors inspected at different guard ratios: {sorted(ratios)}")
    return ratios.pop() if ratios else 0.0


def _fit_text(pair: HardPair) -> str:
    return "n/a (the anchor's own pair scores <= 0)" if pair.caption_fit is None else f"{pair.caption_fit:.3f}"


def _fit_attribute(pair: HardPair) -> str:
    """data-caption-fit's value: empty where the pair has none."""
    return "" if pair.caption_fit is None else f"{pair.caption_fit:.6f}"


def _pair_attributes(pair: HardPair, guard_ratio: float) -> str:
    """The guard's data attributes of a pair: its cross terms and caption fit where known, the mark at a ratio."""
    attributes = ""
    if pair.image_text is not None:
        attributes += f' data-image-text="{pair.image_text:.6f}" data-text-image="{pair.text_image:.6f}"'
        attributes += f' data-caption-fit="{_fit_attribute(pair)}"'
    if guard_ratio:
        attributes += f' data-guard-drop="{str(pair.guard_dropped).lower()}"'
    return attributes


def _guard_header(anchors: Sequence[AnchorPairs], guard_ratio: float, compare_ratios: Sequence[float]) -> list[str]:
    ratios = ([guard_ratio] if guard_ratio else []) + [r for r in compare_ratios if r != guard_ratio]
    if not ratios:
        return []
    counts = guard_counts(anchors, ratios)
    parts = []
    if guard_ratio:
        count = counts[0]
        parts.append(
            f'<p class="guard-summary" data-ratio="{count.ratio:g}" data-shown="{count.shown}" '
            f'data-dropped="{count.dropped}" data-flagged="{count.flagged}">{html.escape(count.summary())}. '
            f"Framed in dashed orange: the pairs a Mine with positive_ratio {count.ratio:g} drops. Caption fit = "
            "max(&lt;image_i, text_j&gt;, &lt;text_i, image_j&gt;) / &lt;image_i, text_i&gt;: the guard drops a "
            "pair at every ratio up to its caption fit.</p>"
        )
    if len(counts) > 1:
        rows = "".join(
            f'<tr data-ratio="{c.ratio:g}" data-dropped="{c.dropped}" data-flagged="{c.flagged}"><td>{c.ratio:g}</td>'
            f"<td>{c.dropped} of {c.shown}</td><td>{c.flagged}</td></tr>"
            for c in counts
        )
        parts.append(
            '<table class="guard-ratios"><tr><th>positive_ratio</th><th>pairs dropped</th>'
            f"<th>of which flagged</th></tr>{rows}</table>"
        )
    return parts


def _guarded_block(anchor: AnchorPairs, uri: Callable[[int], str]) -> str:
    """What a Mine with the guard returns for the anchor: ranks of the pairs shown above, figures of the others."""
    ratio = anchor.guard_ratio
    rank_of = {pair.id: rank for rank, pair in enumerate(anchor.pairs, start=1)}
    above = [f"#{rank_of[pair.id]}" for pair in anchor.guarded if pair.id in rank_of]
    further = [pair for pair in anchor.guarded if pair.id not in rank_of]
    text = f"a Mine with the guard at {ratio:g} returns {len(anchor.guarded)} pairs: "
    text += f"{', '.join(above)} above" if above else "none of those above"
    text += f", and {len(further)} from further down" if further else ""
    ids = ",".join(str(pair.id) for pair in anchor.guarded)
    parts = [f'<div class="guarded" data-ratio="{ratio:g}" data-ids="{ids}"><p>{html.escape(text)}</p>']
    if further:
        parts.append('<ol class="guarded-pairs">')
        for pair in further:
            details = _scores_list([("score", f"{pair.score:.3f}"), ("fit", _fit_text(pair)), ("id", str(pair.id))])
            alt = f"guarded pair {pair.id} of anchor {anchor.anchor.id}"
            figure = _figure("sample", uri(pair.id), alt, pair.caption, details)
            parts.append(
                f'<li class="guarded-pair" data-id="{pair.id}" data-score="{pair.score:.6f}" '
                f'data-caption-fit="{_fit_attribute(pair)}">{figure}</li>'
            )
        parts.append("</ol>")
    parts.append("</div>")
    return "".join(parts)


def render_html(
    anchors: Sequence[AnchorPairs],
    image_of: ImageOf,
    *,
    title: str = "helip hard pairs",
    source: str = "",
    rule: FalseNegativeRule | None = None,
    thumb_px: int = 96,
    compare_ratios: Sequence[float] = (),
) -> str:
    """The whole page as a string (UTF-8; captions and every attribute value escaped).

    compare_ratios: guard ratios to count the shown pairs' drops at, in a table beside the anchors' own ratio."""
    rule = rule or FalseNegativeRule()
    guard_ratio = guard_ratio_of(anchors)
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
        f"{html.escape(rule.describe())}</p>",
        *_guard_header(anchors, guard_ratio, compare_ratios),
        "</header>",
    ]
    for anchor in anchors:
        sample = anchor.anchor
        positive = "" if anchor.positive is None else f' data-positive="{anchor.positive:.6f}"'
        parts.append(f'<section class="anchor" data-id="{sample.id}" data-step="{sample.step}"{positive}>')
        details = f'<p class="meta">anchor {sample.id} &middot; step {sample.step}</p>'
        if anchor.positive is not None:
            details += f'<p class="meta">own pair &lt;image, text&gt; {anchor.positive:.3f}</p>'
        if not anchor.stored:
            details += '<p class="missing">not in the index: no pairs</p>'
        parts.append(_figure("sample anchor-sample", uri(sample.id), f"anchor {sample.id}", sample.caption, details))
        parts.append('<ol class="pairs">')
        for rank, pair in enumerate(anchor.pairs, start=1):
            css = "pair" + (" false-negative" if pair.likely_false_negative else "")
            css += " guard-drop" if guard_ratio and pair.guard_dropped else ""
            parts.append(
                f'<li class="{css}" data-id="{pair.id}" data-rank="{rank}" data-step="{pair.step}" '
                f'data-score="{pair.score:.6f}" data-image-sim="{pair.image_sim:.6f}" '
                f'data-text-sim="{pair.text_sim:.6f}"{_pair_attributes(pair, guard_ratio)}>'
            )
            rows = [
                ("score", f"{pair.score:.3f}"),
                ("image", f"{pair.image_sim:.3f}"),
                ("text", f"{pair.text_sim:.3f}"),
            ]
            if pair.image_text is not None:
                rows.append(("fit", "n/a" if pair.caption_fit is None else f"{pair.caption_fit:.3f}"))
            scores = _scores_list([*rows, ("id", str(pair.id)), ("step", str(pair.step))])
            if pair.likely_false_negative:
                scores += f'<p class="flag">likely false negative: {html.escape("; ".join(pair.flags))}</p>'
            if guard_ratio and pair.guard_dropped:
                scores += f'<p class="guard">guard at {guard_ratio:g} drops: caption fit {_fit_text(pair)}</p>'
            parts.append(_figure("sample", uri(pair.id), f"pair {rank} of anchor {sample.id}", pair.caption, scores))
            parts.append("</li>")
        parts.append("</ol>")
        if guard_ratio and anchor.stored:
            parts.append(_guarded_block(anchor, uri))
        parts.append("</section>")
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


Line = tuple[str, tuple[int, int, int]]  # text, colour


def _cell_lines(caption: str, details: Sequence[Line], font, layout: GridLayout) -> list[Line]:
    """The caption wrapped to the thumbnail's width, cut to the lines that the details below it leave."""
    details = list(details)[: layout.text_lines]
    width = layout.thumb_px
    lines: list[str] = []
    for word in caption.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    room = layout.text_lines - len(details)
    if len(lines) > room:
        lines = lines[:room]
        if lines:
            lines[-1] += " …"
    return [(_fit(line, font, width), TEXT_COLOUR) for line in lines] + [
        (_fit(text, font, width), colour) for text, colour in details
    ]


def _dashed_frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour, width: int, dash: int = 4):
    """A rectangle outline of `width` px in dashes (PIL draws solid outlines only); box is inclusive."""
    x0, y0, x1, y1 = box
    for x in range(x0, x1 + 1, 2 * dash):
        end = min(x + dash - 1, x1)
        draw.rectangle([x, y0, end, y0 + width - 1], fill=colour)
        draw.rectangle([x, y1 - width + 1, end, y1], fill=colour)
    for y in range(y0, y1 + 1, 2 * dash):
        end = min(y + dash - 1, y1)
        draw.rectangle([x0, y, x0 + width - 1, end], fill=colour)
        draw.rectangle([x1 - width + 1, y, x1, end], fill=colour)


def render_grid(anchors: Sequence[AnchorPairs], image_of: ImageOf, k: int, layout: GridLayout = GridLayout()):
    """An RGB PIL image of len(anchors) rows x (1 + k) columns; a row with fewer than k pairs leaves blank cells.

    Inspected at a guard ratio, every pair gets a line with its caption fit (orange where the guard drops it) and
    dropped pairs a dashed orange frame in the padding outside the (red) flag frame."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    guard_ratio = guard_ratio_of(anchors)
    grid = Image.new("RGB", layout.size(len(anchors), 1 + k), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font(layout.line_px)
    pad, side = layout.padding_px, layout.thumb_px
    flag_width = max(1, pad // 2)

    def cell(row: int, column: int, sample_id: int, caption: str, details: list[Line], frame, dropped=False) -> None:
        x, y = column * layout.cell_width, row * layout.cell_height
        grid.paste(thumbnail(image_of(sample_id), side), (x + pad, y + pad))
        if frame is not None:
            low, high = pad - flag_width, pad + side + flag_width - 1
            draw.rectangle([x + low, y + low, x + high, y + high], outline=frame, width=flag_width)
        if dropped:
            box = (x, y, x + layout.cell_width - 1, y + 2 * pad + side - 1)
            _dashed_frame(draw, box, GUARD_COLOUR, max(1, pad - flag_width))
        for index, (line, colour) in enumerate(_cell_lines(caption, details, font, layout)):
            draw.text((x + pad, y + 2 * pad + side + index * layout.line_px), line, fill=colour, font=font)

    for row, anchor in enumerate(anchors):
        sample = anchor.anchor
        details = [(f"anchor {sample.id} s{sample.step}", MUTED_COLOUR)]
        if guard_ratio and anchor.positive is not None:
            details.append((f"own pair {anchor.positive:.2f}", MUTED_COLOUR))
        cell(row, 0, sample.id, sample.caption, details, (42, 111, 219))
        for column, pair in enumerate(anchor.pairs[:k], start=1):
            frame = FLAG_COLOUR if pair.likely_false_negative else None
            # The scores line takes the flag frame's colour: a flagged pair's scores are red as well as its frame.
            details = [(f"{pair.score:.2f} i{pair.image_sim:.2f} t{pair.text_sim:.2f}", frame or MUTED_COLOUR)]
            dropped = bool(guard_ratio) and pair.guard_dropped
            if guard_ratio:
                fit = "n/a" if pair.caption_fit is None else f"{pair.caption_fit:.2f}"
                drop = f" drop@{guard_ratio:g}" if dropped else ""
                details.append((f"fit {fit}{drop}", GUARD_COLOUR if dropped else MUTED_COLOUR))
            cell(row, column, pair.id, pair.caption, details, frame, dropped)
    return grid
