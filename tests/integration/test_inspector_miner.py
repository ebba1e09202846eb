"""helip-inspect against a real miner (in-process gRPC server on port 0): pairs, scores and steps from its rows."""

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


def test_inspect_a_running_miner(miner, tmp_path, capsys):
    captions = ["a red circle", "A red circle.", "a blue circle", "a green square", "a far thing", "never pushed"]
    rows = ["filepath\ttitle"]
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (40 * i, 90, 90)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\t{caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    image = np.array([_unit(c) for c in (1.0, 0.9, 0.8, 0.6, 0.0)], dtype=np.float32)
    text = np.array([_unit(c) for c in (1.0, 0.95, 0.7, 0.6, 0.1)], dtype=np.float32)
    # The rows live in a run's namespace (as helip-train's do); the default namespace holds other rows.
    with MinerClient(ClientConfig(f"127.0.0.1:{miner.port}", namespace="run-a")) as client:
        client.ensure_namespace(dim=3)
        client.upsert([0, 1, 2], image[:3], text[:3], step=5)
        client.upsert([3, 4], image[3:], text[3:], step=9)
    with MinerClient(f"127.0.0.1:{miner.port}") as client:
        client.upsert([0, 1, 2], image[[4, 3, 2]], text[[4, 3, 2]], step=1)

    out = tmp_path / "out"
    code = main(
        ["--data", str(tmp_path / "pairs.csv"), "--miner", f"127.0.0.1:{miner.port}", "--ids", "0,5", "--k", "3"]
        + ["--out", str(out), "--max-similarity", "0.99", "--namespace", "run-a"]
    )

    assert code == 0
    assert json.loads(capsys.readouterr().out)["html"] == str(out / "index.html")
    anchor, missing = json.loads((out / "pairs.json").read_text())
    assert anchor["anchor"] == {"id": 0, "caption": "a red circle", "step": 5} and anchor["stored"]
    assert [(p["id"], p["step"]) for p in anchor["pairs"]] == [(1, 5), (2, 5), (3, 9)]
    first = anchor["pairs"][0]
    assert (first["image_sim"], first["text_sim"]) == (pytest.approx(0.9, abs=1e-5), pytest.approx(0.95, abs=1e-5))
    assert first["score"] == pytest.approx(0.9 * 0.95, abs=1e-5)  # the miner's product scoring
    assert first["flags"] == ["same caption"] and not anchor["pairs"][1]["flags"]
    assert missing == {"anchor": {"id": 5, "caption": "never pushed", "step": 0}, "pairs": [], "stored": False}
    assert 'class="pair false-negative" data-id="1"' in (out / "index.html").read_text()


def test_a_bad_namespace_is_refused_naming_the_flag(miner, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\n0.png\ta thing\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "pairs.csv"), "--miner", f"127.0.0.1:{miner.port}", "--namespace", "no spaces"])
    assert exit_info.value.code == 2
    assert "--namespace" in capsys.readouterr().err
