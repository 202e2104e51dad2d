"""Which process does what, and how the processes agree before one of them acts on disk.

Writers (save_adapter, save_checkpoint, the Trainer callback) let one process write and the others wait. A
refusal or an error on one process must then reach all of them: a process that raises alone leaves the others
waiting in the next collective until the job's timeout. The helpers here make every process raise together.

They follow DeepSpeed's process group (`deepspeed.comm`); without DeepSpeed, or before it is initialised, there
is one process and every helper is a no-op.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Type

import torch


def _comm():
    """deepspeed.comm when a multi-process group is up, else None."""
    try:
        import deepspeed.comm as dist
    except ImportError:
        return None
    return dist if dist.is_initialized() else None


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


def _flag(ok: bool) -> torch.Tensor:
    from deepspeed.accelerator import get_accelerator

    return torch.tensor([1 if ok else 0], dtype=torch.int32, device=get_accelerator().current_device_name())


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


SHARED_CHECK = ".beamlora_shared_check-{nonce}-{rank}"


def check_shared_folder(folder: str, node_local: bool, error: Type[Exception] = ValueError) -> None:
    """Refuse, on every process, an output folder that does not fit how checkpoints are published. Without
    DeepSpeed's node-local storage, process 0 renames checkpoint folders and moves `latest`: every process must see
    the folder it writes in (a shared file system), or the other nodes' files are never published. With it, each
    node's first process publishes its node's folder: nodes must not share one, or two would rename the same
    folder. Each node's first process writes a probe file; every process says whose it sees."""
    if not is_distributed():
        return
    import secrets

    nonce = all_values(secrets.token_hex(8) if rank() == 0 else None)[0]
    writes = int(os.environ.get("LOCAL_RANK", rank())) == 0  # each node's first process
    probe = os.path.join(folder, SHARED_CHECK.format(nonce=nonce, rank=rank()))
    if writes:
        try:
            os.makedirs(folder, exist_ok=True)
            open(probe, "w").close()
        except OSError as e:  # not writable: said below by every process, none left waiting
            writes = False
            logging.getLogger(__name__).warning("Cannot write into the output folder %r: %s", folder, e)
    writers = [r for r, w in enumerate(all_values(writes)) if w]  # also the barrier after the writes
    seen = [r for r in writers if os.path.exists(os.path.join(folder, SHARED_CHECK.format(nonce=nonce, rank=r)))]
    try:
        if node_local:
            all_ranks_or_raise(len(seen) <= 1, f"DeepSpeed's node-local checkpoint storage is on, but the output "
                               f"folder {folder!r} is shared by the nodes: each node's first process would publish "
                               "the same checkpoint folders. Remove \"use_node_local_storage\" from the ds_config's "
                               "\"checkpoint\" section (a shared folder needs no node-local storage).", error)
        else:
            all_ranks_or_raise(0 in seen, f"The output folder {folder!r} is not shared by all processes: some "
                               "process (on another node) does not see what process 0 wrote there. Checkpoints need "
                               "one folder that every node sees (a shared file system), or DeepSpeed's node-local "
                               'storage: add "checkpoint": {"use_node_local_storage": true} to the ds_config (each '
                               "node then keeps its own processes' files and must resume on the same nodes).", error)
    finally:
        barrier()
        if writes:
            os.remove(probe)


def node_local_storage(engine) -> bool:
    """Whether `engine` keeps checkpoints per node (DeepSpeed's `checkpoint.use_node_local_storage`)."""
    return getattr(engine, "use_node_local_storage", lambda: False)()


def owns_folders(engine) -> bool:
    """The one process that renames checkpoint folders and moves `latest`: global rank 0 on a shared file
    system, each node's local rank 0 with DeepSpeed's node-local checkpoint storage."""
    if _comm() is None:
        return True
    return (engine.local_rank if node_local_storage(engine) else rank()) == 0
