"""Ranks from torchrun / the deepspeed launcher, SLURM's srun, or nothing."""

from __future__ import annotations

import pytest

from helip.trainer.app.launch import dist_env


def test_torchrun_and_deepspeed_variables():
    env = dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert env.export() == {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "1234",
    }


def test_slurm_srun_variables():
    env = dist_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "10.0.0.7" and env.master_port == 20000 + 4242
    # A job script's MASTER_ADDR / MASTER_PORT win; torchrun's variables win over SLURM's (torchrun inside srun).
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "9"}).master_port == 9
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"}).rank == 1


def test_plain_command_is_a_world_of_one():
    env = dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2"),
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ],
)
def test_inconsistent_variables_are_named(environ, message):
    with pytest.raises(ValueError, match=message):
        dist_env(environ)


def test_a_local_miner_is_refused_across_hosts():
    pytest.importorskip("deepspeed")
    from helip.trainer.app.run_mining import refuse_local_miner_across_hosts

    refuse_local_miner_across_hosts(["node0", "node0", "node0"], 64)  # one host: fine
    with pytest.raises(RuntimeError, match=r"2 hosts \(node0, node1\).*--miner HOST:50051"):
        refuse_local_miner_across_hosts(["node0", "node0", "node1", "node1"], 64)


def test_the_public_api_imports_without_deepspeed():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['deepspeed'] = None\n"  # any import of deepspeed now fails
        "import helip\n"
        "from helip import *\n"
        "assert HardPairSampler and EmbeddingPusher and hard_pair_loader and HelipLoss\n"
        "print(len(helip.__all__))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
