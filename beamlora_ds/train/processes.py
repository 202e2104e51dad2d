"""This process's place in a multi-process run: who started it, joining the process group, leaving it clean.

Launchers disagree on how they say which process is which: deepspeed and torchrun set RANK/WORLD_SIZE, mpirun
and srun their own variables, a plain `python script.py` nothing. `rank_environment` turns each into the torch
variables before `init_distributed` joins the group (gloo on a CPU, the accelerator's backend otherwise).
"""
from __future__ import annotations

import datetime
import glob
import os
from typing import Dict, Mapping, Tuple


class LaunchEnvironmentError(ValueError):
    """The launcher's variables cannot place this process in the run; the message says what to export."""


# (rank, world size, local rank) variables of launchers that do not set RANK/WORLD_SIZE themselves
_LAUNCHER_RANK_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                       ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                       ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def rank_environment(env: Mapping[str, str]) -> Dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* to add: from mpirun or srun variables, or a world of one for plain
    `python launch/train.py`. Nothing when a torch-style launcher (deepspeed, torchrun) already set RANK."""
    if "RANK" in env:
        return {}
    for rank, size, local in _LAUNCHER_RANK_VARS:
        if rank in env and size in env:
            if int(env[size]) > 1 and "MASTER_ADDR" not in env:
                raise LaunchEnvironmentError(
                    f"Started by a launcher that sets {rank}/{size} but no MASTER_ADDR: export MASTER_ADDR (the "
                    "first node's address) and MASTER_PORT before launching.")
            return {"RANK": env[rank], "WORLD_SIZE": env[size], "LOCAL_RANK": env.get(local, "0"),
                    "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def launched_world_size(env: Mapping[str, str]) -> int:
    """The world size the launcher announces, known before any process connects: checks that depend on it can
    refuse without a process waiting for the others."""
    return int({**env, **rank_environment(dict(env))}.get("WORLD_SIZE", 1))


def init_distributed(timeout_s: float) -> Tuple[int, int]:
    """Join the run's process group (a stuck collective fails after `timeout_s`); returns (rank, world size)."""
    os.environ.update(rank_environment(dict(os.environ)))
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def release_shm_buffers(dist) -> None:
    """DeepSpeed's CPU shared-memory comm op never removes its 64 MB /dev/shm buffer: each process unlinks its own
    once every process is past its last collective (mappings stay valid after unlink; docs/platform.md)."""
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_" \
           f"{os.environ.get('RANK')}"
    for path in glob.glob(os.path.join("/dev/shm", name)):
        try:
            os.unlink(path)
        except OSError:
            pass
