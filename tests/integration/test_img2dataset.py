"""img2dataset's shards as training data, end to end: the real img2dataset CLI downloads generated images from a local
HTTP server (some URLs broken), then helip-train trains on the shards it wrote. The commands are the README's
img2dataset block, run as written (docs/FROM_OPEN_CLIP.md holds the same block)."""

from __future__ import annotations

import csv
import fcntl
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from helip.trainer.pairs.data import WebDatasetPairs, read_pairs
from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

IMG2DATASET_VERSION = "1.47.0"
PAGES = [ROOT / "README.md", ROOT / "docs" / "FROM_OPEN_CLIP.md"]
URLS, PER_SHARD = 125, 25  # the block's --number_sample_per_shard: shards 00000..00004
NOT_FOUND = (5, 37, 38, 99)  # rows whose URL answers 404: img2dataset's failed_to_download
GARBAGE = (61,)  # a URL that answers 200 with bytes that are no image: img2dataset's failed_to_resize


def venv_cache() -> Path:
    """Where test venvs live between runs; CI points HELIP_TEST_VENVS at a directory of its run."""
    return Path(os.environ.get("HELIP_TEST_VENVS", Path.home() / ".cache" / "helip-test-venvs"))


@pytest.fixture(scope="session")
def img2dataset_bin() -> Path:
    """img2dataset's console script, from a venv of its own created on first use and kept (a minute or two once).

    Never this environment: img2dataset pins webdataset<0.3 and pandas<3, and installing it here would downgrade
    this environment's. The venv is marked complete only after pip succeeds, so an interrupted install is redone;
    the lock makes a second test run wait for the first one's install instead of racing it."""
    venv = venv_cache() / f"img2dataset-{IMG2DATASET_VERSION}"
    complete = venv / "helip-test-complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            shutil.rmtree(venv, ignore_errors=True)
            started = time.monotonic()
            for argv in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", f"img2dataset=={IMG2DATASET_VERSION}"],
            ):
                result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
            complete.write_text(f"created in {time.monotonic() - started:.0f} s\n")
    return venv / "bin" / "img2dataset"


class ImageHandler(http.server.SimpleHTTPRequestHandler):
    """Files under the served directory, and /garbage.jpg: a 200 whose body is no image."""

    def do_GET(self):
        if self.path != "/garbage.jpg":
            return super().do_GET()
        body = b"\xff\xd8 this is not a JPEG " * 20
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # the downloads are the test's business, not its output's
        pass


@pytest.fixture
def image_server(tmp_path):
    """The synthetic set's images over HTTP on a free 127.0.0.1 port: (base URL, generated set)."""
    paths = generate(SynthConfig(out_dir=tmp_path / "synth", train_size=URLS - len(NOT_FOUND) - len(GARBAGE)))
    handler = functools.partial(ImageHandler, directory=str(paths.root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", paths
    server.shutdown()
    server.server_close()
    thread.join()


def page_commands(page: Path) -> list[list[str]]:
    """The shell commands between a page's `img2dataset commands: begin/end` markers, continuations joined."""
    marks = r"<!-- img2dataset commands: begin -->\s*```bash\n(.*?)```\s*<!-- img2dataset commands: end -->"
    block = re.search(marks, page.read_text(), re.S)
    assert block, f"{page.name} lost its img2dataset commands block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def write_url_list(path: Path, base_url: str, images: list[tuple[Path, str]], root: Path) -> dict[int, tuple]:
    """pairs.csv (url, caption): the generated images in order, broken URLs at their rows. Returns {row: (image
    file, caption)} of the rows that should download (by row: the synthetic set repeats some captions)."""
    good = iter(images)
    rows, expected = [], {}
    for row in range(URLS):
        if row in NOT_FOUND:
            rows.append((f"{base_url}/no-such-image-{row}.jpg", f"a caption whose image is gone {row}"))
        elif row in GARBAGE:
            rows.append((f"{base_url}/garbage.jpg", f"a caption whose image is garbage {row}"))
        else:
            expected[row] = image, caption = next(good)
            rows.append((f"{base_url}/{image.relative_to(root).as_posix()}", caption))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return expected


def test_helip_trains_on_img2dataset_shards_as_written(tmp_path, image_server, img2dataset_bin):
    commands = page_commands(PAGES[0])
    assert page_commands(PAGES[1]) == commands, "README.md and docs/FROM_OPEN_CLIP.md show different commands"
    assert [argv[0] for argv in commands] == ["img2dataset", "helip-train"]
    base_url, synth = image_server
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")  # the block's relative paths, from a user's checkout
    images = read_pairs(synth.train_csv)
    expected = write_url_list(work / "pairs.csv", base_url, images, synth.root)

    # no_proxy: a proxy in the environment must not be asked for 127.0.0.1; albumentations (an img2dataset
    # dependency) would otherwise look for a newer release of itself on the network at import.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    programs = {"img2dataset": img2dataset_bin, "helip-train": Path(sys.executable).with_name("helip-train")}
    extra = {"helip-train": ["--set", "run.record_ids=true", "--set", "run.progress=false"]}  # what was trained
    outputs = {}
    for program, *args in commands:
        argv = [str(programs[program]), *args, *extra.get(program, [])]
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        outputs[program] = result.stdout + result.stderr

    # What img2dataset wrote: a tar, a _stats.json and a .parquet per shard; the broken URLs are absent.
    shards = work / "shards"
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"{k:05d}.tar" for k in range(URLS // PER_SHARD)]
    assert len(list(shards.glob("*_stats.json"))) == len(list(shards.glob("*.parquet"))) == URLS // PER_SHARD

    # Every URL that downloaded is a sample, with its caption and its image, under the key of its row.
    to_tensor = transforms.ToTensor()
    dataset = WebDatasetPairs(str(shards / "{00000..00004}.tar"), to_tensor, lambda captions: torch.zeros(1, 1))
    assert len(dataset) == len(expected) == len(images)
    keys = {f"{row // PER_SHARD:05d}{row % PER_SHARD:02d}": row for row in expected}  # shard, then row in shard
    assert sorted(dataset.key(i) for i in range(len(dataset))) == sorted(keys)
    for sample_id in range(len(dataset)):
        image_file, caption = expected[keys[dataset.key(sample_id)]]
        assert dataset.caption(sample_id) == caption
        _, image, _ = dataset[sample_id]  # img2dataset's JPEG of the generated PNG: close, not equal
        original = to_tensor(Image.open(image_file).convert("RGB"))
        assert (image - original).abs().mean() < 0.06, f"sample {sample_id} (key {dataset.key(sample_id)})"

    # The run trained on every downloaded sample (an epoch of 120 is 15 batches of 8 anchors)...
    run = work / "runs" / "img2dataset"
    assert np.load(run / "seen-ids-rank0.npy").tolist() == list(range(len(dataset)))
    # ...and counted the broken URLs, in its log and its summary, by img2dataset's reasons.
    broken = len(NOT_FOUND) + len(GARBAGE)
    log_line = f"{broken} of {URLS} samples in these shards failed to download"
    assert log_line in outputs["helip-train"]
    data = json.loads((run / "summary.json").read_text())["data"]
    assert data["samples"] == len(expected) and data["attempted"] == URLS and data["missing"] == broken
    assert data["missing_by_kind"] == {"failed_to_download": len(NOT_FOUND), "failed_to_resize": len(GARBAGE)}
    assert sum(data["errors"].values()) == broken and any("404" in message for message in data["errors"])
    assert (run / "final.pt").exists()
