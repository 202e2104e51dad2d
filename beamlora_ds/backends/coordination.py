"""Which process does what, and how the processes agree before one of them acts: process ranks, barriers, and
raising together.

Writers (save_adapter, save_checkpoint, the Trainer callback) let one process write and the others wait. A
refusal or an error on one process must then reach all of them: a process that raises alone leaves the others
waiting in the next collective until the job's timeout. The helpers here make every process raise together.

They follow DeepSpeed's process group (`deepspeed.comm`) when DeepSpeed initialised one, else torch.distributed's
default group (Megatron, plain DDP); with neither there is one process and every helper is a no-op.
"""
from __future__ import annotations

import sys
from typing import Optional, Type

import torch


def _comm():
    """deepspeed.comm when DeepSpeed set up the process group, else torch.distributed when it is initialised (a
    Megatron or plain torch job), else None."""
    ds_dist = None
    if "deepspeed" in sys.modules:  # only an imported DeepSpeed can have set up a group (importing it costs seconds)
        try:
            import deepspeed.comm as ds_dist
        except ImportError:
            ds_dist = None
    if ds_dist is not None and ds_dist.is_initialized():
        return ds_dist
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    dist = _comm()
    return dist.get_rank() if dist is not None else 0


def is_process_zero() -> bool:
    """Whether this process speaks for all (one log line, one log record): process 0 of an initialized
    torch.distributed group, DeepSpeed's included, or the only process. Read from torch.distributed, not
    deepspeed.comm, so a plain torch.distributed job has one process 0 too."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    """How many processes the job has (1 outside a distributed job)."""
    dist = _comm()
    return dist.get_world_size() if dist is not None else 1


def is_distributed() -> bool:
    """True when collectives are needed: more than one process."""
    return world_size() > 1


def barrier() -> None:
    """Wait for every process (no-op with one process)."""
    if is_distributed():
        _comm().barrier()


def _device(dist) -> str:
    """Where a tensor must be for a collective of `dist` (NCCL reduces GPU tensors only)."""
    if dist is torch.distributed:
        return "cuda" if dist.get_backend() == "nccl" else "cpu"
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def _flag(ok: bool) -> torch.Tensor:
    return torch.tensor([1 if ok else 0], dtype=torch.int32, device=_device(_comm()))


def all_reduce_ints(values, op: str = "SUM") -> list:
    """Integers summed ("SUM") or maximised ("MAX") over every process (unchanged with one process)."""
    if not is_distributed():
        return list(values)
    dist = _comm()
    tensor = torch.tensor(list(values), dtype=torch.int64, device=_device(dist))
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.cpu().tolist()


def all_agree(value: float) -> bool:
    """Whether every process has the same `value` (the debug consistency check)."""
    if not is_distributed():
        return True
    values = all_values(float(value))
    return all(v == values[0] for v in values)


def rank0_verdict(ok: bool) -> bool:
    """Rank 0's `ok` on every process (a broadcast, so also a barrier).

    For "rank 0 checks, rank 0 writes": a refusal there must stop the others too, instead of leaving them
    waiting in the next collective. The other processes' own `ok` is ignored.
    """
    if not is_distributed():
        return ok
    flag = _flag(ok)
    _comm().broadcast(flag, src=0)
    return bool(flag.item())


def all_ranks_or_raise(ok: bool, message: str, error: Type[Exception] = FileNotFoundError) -> None:
    """Raise `error(message)` on every process when any process is not ok (a MIN all-reduce), so that none is
    left waiting in a collective. For checks each process makes on its own files."""
    if is_distributed():
        dist = _comm()
        flag = _flag(ok)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        raise error(message)


def all_values(value) -> list:
    """Every process's `value` (picklable), in rank order, on every process."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def first_problem(problem: Optional[str]) -> Optional[str]:
    """The first non-None `problem` of any process (in rank order), on every process: for checks that each
    process makes on its own share of the work and whose message only the finder knows."""
    return next((p for p in all_values(problem) if p is not None), None)


def raise_first_error(error: Optional[BaseException]) -> None:
    """Every process raises the first process's `error` (in rank order; None where a process has none): a
    TypeError or ValueError as such, anything else as a RuntimeError with its message. For checks each process makes
    on its own part (a pipeline stage's layers) before any process changes anything or waits in a collective."""
    found = first_problem(None if error is None else (type(error).__name__, str(error)))
    if found is not None:
        kind, message = found
        raise {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)(message)
