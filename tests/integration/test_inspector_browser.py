"""helip-inspect's page, loaded in a real headless chromium: every anchor shows with its pairs and images decode, and
the false-negative guard's marks render (dashed frames on exactly the pairs marked, the summary's counts).

The page comes from the real CLI over a small synthetic set and the tiny model (random weights: its similarities
all lie near 1, so the near-duplicate cut is switched off to give every anchor its k pairs), inspected at two guard
ratios. Its weights are not seeded, so which pairs the guard drops differs from run to run: the checks hold the page
to its own data (pairs.json), whatever it holds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from helip.trainer.tools.synth import BACKGROUND, SynthConfig, generate

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
ANCHORS, K = 5, 3
RATIOS = ("1", "0.9")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (`bash scripts/dev.sh install` as root adds it)"
    ),
]

# Appended to a copy of the page: after load, write how many images decoded into the DOM for --dump-dom to show.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const probe = document.createElement("div");
  probe.id = "probe";
  probe.dataset.images = images.length;
  probe.dataset.decoded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  // The guard's frame is CSS: count the pair figures the browser draws with a dashed outline.
  const figures = Array.from(document.querySelectorAll("li.pair > figure"));
  probe.dataset.dashed = figures.filter((f) => getComputedStyle(f).outlineStyle === "dashed").length;
  probe.dataset.summary = document.querySelector("p.guard-summary").textContent;
  document.body.appendChild(probe);
});
</script>"""


def _helip_inspect() -> list[str]:
    script = Path(sys.executable).parent / "helip-inspect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "helip.trainer.tools.inspector_cli"]


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    generate(SynthConfig(root / "synth", train_size=200, test_size=8))
    out = root / "out"
    command = [
        *_helip_inspect(),
        "--data",
        str(root / "synth"),
        "--model",
        str(ROOT / "configs/models/helip-tiny.json"),
        "--anchors",
        str(ANCHORS),
        "--seed",
        "1",
        "--k",
        str(K),
        "--max-similarity",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--positive-ratio",
        *RATIOS,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["html"] == str(out / "index.html")
    return out


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, check=True)


class _DomReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: list[tuple[str, list[str]]] = []
        self.pairs: list[dict[str, str]] = []  # every li.pair's attributes, "class" split into a set
        self.summary: dict[str, str] | None = None
        self.probe: dict[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "anchor" in classes:
            self.sections.append((attrs["data-id"], []))
        elif tag == "li" and "pair" in classes:
            self.sections[-1][1].append(attrs["data-id"])
            self.pairs.append({**attrs, "class": set(classes)})
        elif tag == "p" and "guard-summary" in classes:
            self.summary = attrs
        elif attrs.get("id") == "probe":
            self.probe = attrs


def _guarded_further_down(anchors: list[dict]) -> int:
    """Pairs a guarded Mine returns that are not among their anchor's shown pairs: the page shows them too."""
    return sum(len({p["id"] for p in a["guarded"]} - {p["id"] for p in a["pairs"]}) for a in anchors)


def test_page_shows_every_anchor_with_its_pairs_and_decoded_images(page_dir, tmp_path):
    probe_page = tmp_path / "probe.html"
    probe_page.write_text((page_dir / "index.html").read_text().replace("</body>", PROBE + "</body>"))

    dom = _chromium(tmp_path, "--dump-dom", probe_page.as_uri()).stdout

    reader = _DomReader()
    reader.feed(dom)
    expected = json.loads((page_dir / "pairs.json").read_text())
    assert [(int(i), [int(p) for p in pairs]) for i, pairs in reader.sections] == [
        (a["anchor"]["id"], [p["id"] for p in a["pairs"]]) for a in expected
    ]
    assert len(reader.sections) == ANCHORS and all(len(pairs) == K for _, pairs in reader.sections)
    assert reader.probe is not None, "the load handler never ran"
    images = ANCHORS * (1 + K) + _guarded_further_down(expected)
    assert reader.probe["data-images"] == reader.probe["data-decoded"] == str(images)


def test_page_marks_what_the_guard_drops(page_dir, tmp_path):
    probe_page = tmp_path / "probe.html"
    probe_page.write_text((page_dir / "index.html").read_text().replace("</body>", PROBE + "</body>"))

    reader = _DomReader()
    reader.feed(_chromium(tmp_path, "--dump-dom", probe_page.as_uri()).stdout)

    expected = [p for a in json.loads((page_dir / "pairs.json").read_text()) for p in a["pairs"]]
    assert len(reader.pairs) == len(expected) == ANCHORS * K
    for shown, pair in zip(reader.pairs, expected):
        if pair["caption_fit"] is None:  # random weights: an anchor's own pair may score <= 0, leaving no fit
            assert shown["data-caption-fit"] == ""
        else:
            assert float(shown["data-caption-fit"]) == pytest.approx(pair["caption_fit"], abs=1e-6)
        assert shown["data-guard-drop"] == str(pair["guard_dropped"]).lower()
        assert ("guard-drop" in shown["class"]) is pair["guard_dropped"]
    dropped = sum(p["guard_dropped"] for p in expected)
    flagged = sum(p["guard_dropped"] and bool(p["flags"]) for p in expected)
    assert reader.probe["data-dashed"] == str(dropped)  # the browser draws the frame on exactly those
    assert (reader.summary["data-ratio"], reader.summary["data-dropped"]) == (RATIOS[0], str(dropped))
    summary = re.sub(r"\s+", " ", reader.probe["data-summary"])
    assert summary.startswith(
        f"the guard at {RATIOS[0]} drops {dropped} of {ANCHORS * K} shown pairs "
        f"({flagged} of them also flagged as likely false negatives)"
    )


def test_page_renders_the_images(page_dir, tmp_path):
    screenshot = tmp_path / "page.png"
    _chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1200,900", (page_dir / "index.html").as_uri())

    pixels = Image.open(screenshot).convert("RGB")
    # The synthetic images' dark background covers most of every thumbnail; a blank or broken page has none.
    dark = sum(count for count, colour in pixels.getcolors(1 << 24) if colour == BACKGROUND)
    assert dark > 4 * 96 * 96 // 2, f"only {dark} pixels of the images' background on the screenshot"


def test_grid_png_has_a_row_per_anchor(page_dir):
    from helip.trainer.tools.inspector_page import GridLayout

    assert Image.open(page_dir / "grid.png").size == GridLayout().size(ANCHORS, 1 + K)
