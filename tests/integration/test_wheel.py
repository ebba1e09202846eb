"""The wheel a user installs: one top-level package (`helip`), so a user's own `trainer` or `miner_service` package
is never shadowed, and examples/plain_loop.py trains from a venv that holds the wheel and not the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helip.trainer.tools.synth import SynthConfig, generate
from tests.conftest import ROOT
from tests.integration.test_examples import EMBED_DIM, TRAIN_SIZE, check_plain_loop, plain_loop_args

pytestmark = pytest.mark.slow

# What the build reads; the rest of the checkout is not in the wheel. helip/miner (the stubs) is generated anew.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "protos", "helip", "miner_service", "trainer"]


def run(command: list, cwd: Path, timeout_s: float = 120, expect_rc: int = 0) -> str:
    # No PYTHONPATH: the checkout must not leak into the fresh venv.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    output = result.stdout + result.stderr
    assert result.returncode == expect_rc, output[-8000:]
    return output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources: building in the checkout would write build/, the egg-info and
    the stubs under the feet of other test runs."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    shutil.rmtree(source / "helip" / "miner", ignore_errors=True)
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out]
    run([*pip_wheel, source], out)
    (built,) = out.glob("helip-*.whl")
    return built


def test_the_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
        declared = set(archive.read(top_level).decode().split()) if top_level else {"helip"}
    installed = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert installed == {"helip"} and declared == {"helip"}, (installed, declared)
    assert "helip/miner/v1/miner_pb2_grpc.py" in names  # the generated stubs travel in the wheel


def test_plain_loop_runs_from_the_wheel_beside_a_users_own_trainer_package(wheel, tmp_path, miner_factory):
    # A fresh venv that sees the project venv's dependencies (torch, grpc, open_clip…) through a .pth line, but not
    # its editable helip: the .pth files of a directory named in a .pth are not processed, so its finder never runs.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(run([python, "-c", purelib], tmp_path).strip())
    (site_packages / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    assert "No module named 'helip'" in run([python, "-c", "import helip"], tmp_path, expect_rc=1)
    run([python, "-c", "import torch, grpc, open_clip"], tmp_path)
    # --target installs beside nothing else: pip neither sees nor touches the project venv's editable helip.
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site_packages, wheel], tmp_path)

    # A user's project with a `trainer` package of its own, which helip must not shadow (nor be shadowed by).
    project = tmp_path / "project"
    (project / "trainer").mkdir(parents=True)
    (project / "trainer" / "__init__.py").write_text('WHO = "user"\n')
    shutil.copy2(ROOT / "examples" / "plain_loop.py", project)
    where = "import json, helip, helip.trainer.pairs, trainer; print(json.dumps([trainer.WHO, helip.__file__]))"
    who, helip_file = json.loads(run([python, "-c", where], project).splitlines()[0])  # stdout comes first
    assert who == "user"
    assert Path(helip_file).is_relative_to(venv), helip_file

    data = generate(SynthConfig(out_dir=tmp_path / "synth", train_size=TRAIN_SIZE, test_size=16, retrieval_size=16))
    miner = miner_factory("--dim", str(EMBED_DIM))
    final = tmp_path / "final.pt"
    model = ROOT / "configs" / "models" / "helip-tiny.json"  # the example's default, relative to the checkout
    args = plain_loop_args(data.train_csv, miner.address, final)
    output = run([python, project / "plain_loop.py", *args, "--model", model], project, timeout_s=180)
    check_plain_loop(output, miner.address, final)
