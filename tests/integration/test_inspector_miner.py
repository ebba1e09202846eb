"""helip-inspect against a real miner (in-process gRPC server on port 0): pairs, scores and steps from its rows, and
the false-negative guard's marks from its fetched rows beside a guarded Mine's answer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from helip.miner_service.client.single import ClientConfig, MinerClient
from helip.miner_service.service.config import MinerConfig
from helip.miner_service.service.server import MinerServer
from helip.trainer.tools.inspector_cli import main


def _unit(cos: float) -> list[float]:
    return [cos, math.sqrt(1 - cos * cos), 0.0]


@pytest.fixture
def miner():
    server = MinerServer(MinerConfig(dim=3, port=0, metrics_port=-1, workers=2)).start()
    yield server
    server.stop(0)


# Anchor 0's image and caption are both (1, 0, 0), so its own pair scores 1 and each row's cross terms against it
# are that row's cosines: the caption fit of row j is max(IMAGE_COS[j], TEXT_COS[j]).
IMAGE_COS = (1.0, 0.9, 0.8, 0.6, 0.0)
TEXT_COS = (1.0, 0.95, 0.7, 0.6, 0.1)


@pytest.fixture
def run_rows(miner, tmp_path):
    """A data set of six samples, five of them pushed into the miner's namespace "run-a"; the path of its csv."""
    captions = ["a red circle", "A red circle.", "a blue circle", "a green square", "a far thing", "never pushed"]
    rows = ["filepath\ttitle"]
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (40 * i, 90, 90)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\t{caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    image = np.array([_unit(c) for c in IMAGE_COS], dtype=np.float32)
    text = np.array([_unit(c) for c in TEXT_COS], dtype=np.float32)
    # The rows live in a run's namespace (as helip-train's do); the default namespace holds other rows.
    with MinerClient(ClientConfig(f"127.0.0.1:{miner.port}", namespace="run-a")) as client:
        client.ensure_namespace(dim=3)
        client.upsert([0, 1, 2], image[:3], text[:3], step=5)
        client.upsert([3, 4], image[3:], text[3:], step=9)
    with MinerClient(f"127.0.0.1:{miner.port}") as client:
        client.upsert([0, 1, 2], image[[4, 3, 2]], text[[4, 3, 2]], step=1)
    return tmp_path / "pairs.csv"


def _inspect(miner, data, out, *flags: str) -> int:
    return main(
        ["--data", str(data), "--miner", f"127.0.0.1:{miner.port}", "--ids", "0,5", "--k", "3"]
        + ["--out", str(out), "--max-similarity", "0.99", "--namespace", "run-a", *flags]
    )


def test_inspect_a_running_miner(miner, run_rows, tmp_path, capsys):
    out = tmp_path / "out"
    code = _inspect(miner, run_rows, out)

    assert code == 0
    assert json.loads(capsys.readouterr().out)["html"] == str(out / "index.html")
    anchor, missing = json.loads((out / "pairs.json").read_text())
    assert anchor["anchor"] == {"id": 0, "caption": "a red circle", "step": 5} and anchor["stored"]
    assert [(p["id"], p["step"]) for p in anchor["pairs"]] == [(1, 5), (2, 5), (3, 9)]
    first = anchor["pairs"][0]
    assert (first["image_sim"], first["text_sim"]) == (pytest.approx(0.9, abs=1e-5), pytest.approx(0.95, abs=1e-5))
    assert first["score"] == pytest.approx(0.9 * 0.95, abs=1e-5)  # the miner's product scoring
    assert first["flags"] == ["same caption"] and not anchor["pairs"][1]["flags"]
    assert missing["anchor"] == {"id": 5, "caption": "never pushed", "step": 0}
    assert (missing["pairs"], missing["stored"], missing["positive"]) == ([], False, None)
    assert not anchor["guard_ratio"] and not anchor["guarded"]  # no ratio asked: no guard marks
    assert 'class="pair false-negative" data-id="1"' in (out / "index.html").read_text()


def test_a_bad_namespace_is_refused_naming_the_flag(miner, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\n0.png\ta thing\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "pairs.csv"), "--miner", f"127.0.0.1:{miner.port}", "--namespace", "no spaces"])
    assert exit_info.value.code == 2
    assert "--namespace" in capsys.readouterr().err


def test_inspect_a_running_miner_at_a_guard_ratio(miner, run_rows, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        code = _inspect(miner, run_rows, out, "--positive-ratio", "0.9", "0.75", "0.5")

    assert code == 0 and json.loads(capsys.readouterr().out)["grid"] == str(out / "grid.png")
    anchor, missing = json.loads((out / "pairs.json").read_text())
    assert anchor["positive"] == pytest.approx(1.0) and anchor["guard_ratio"] == 0.9
    # Mined without the guard: pair 1 (caption fit 0.95) is still shown, marked, and flagged as well.
    assert [p["id"] for p in anchor["pairs"]] == [1, 2, 3]
    fits = [max(IMAGE_COS[j], TEXT_COS[j]) for j in (1, 2, 3)]
    assert [p["caption_fit"] for p in anchor["pairs"]] == pytest.approx(fits, abs=1e-6)
    assert [(p["image_text"], p["text_image"]) for p in anchor["pairs"]] == [
        (pytest.approx(TEXT_COS[j], abs=1e-6), pytest.approx(IMAGE_COS[j], abs=1e-6)) for j in (1, 2, 3)
    ]
    assert [p["guard_dropped"] for p in anchor["pairs"]] == [True, False, False]
    assert anchor["pairs"][0]["flags"] == ["same caption"]
    # The miner's own guarded Mine: 1 goes, 4 (fit 0.1) comes up from further down.
    assert [p["id"] for p in anchor["guarded"]] == [2, 3, 4]
    assert missing["guard_ratio"] == 0.9 and missing["guarded"] == [] and missing["positive"] is None

    page = (out / "index.html").read_text()
    assert 'class="pair false-negative guard-drop" data-id="1"' in page
    assert 'data-caption-fit="0.950000" data-guard-drop="true"' in page
    assert '<div class="guarded" data-ratio="0.9" data-ids="2,3,4">' in page
    summary = "the guard at 0.9 drops 1 of 3 shown pairs (1 of them also flagged as likely false negatives)"
    assert summary in page and summary in caplog.text
    # The table compares the three ratios on the same pairs: at 0.75 pair 2 (fit 0.8) goes too, at 0.5 all three.
    assert [line.split() for line in caplog.text.split("each ratio asked:\n")[1].splitlines()[1:4]] == [
        ["0.9", "1", "of", "3", "1"],
        ["0.75", "2", "of", "3", "1"],
        ["0.5", "3", "of", "3", "1"],
    ]
