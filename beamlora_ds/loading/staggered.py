"""Loading an unpartitioned model one process per node at a time, so that a node's host memory holds about one
whole copy instead of one per process.

Under ZeRO-3 a 4-bit (bitsandbytes) model cannot be partitioned while it loads: every process builds the whole
model (docs/platform.md, "4-bit under ZeRO-3 loads whole"). Three steps bound a node's peak (docs/qlora.md,
"Loading at scale"):

- `load_in_turns`: the processes of a node load in turns (local rank `L-1` first, local rank 0 last; or `K` at a
  time, `turns:K`); every turn ends with one all-reduce that all processes enter, which also makes an error of the
  loading process raise on every process together (none is left waiting in the next turn).
- `drop_weights_rank0_will_send`: DeepSpeed partitions a parameter by broadcasting it from the first process of
  its partition group (global rank 0) and keeping a shard, so the values every other process loaded are
  overwritten anyway. Those processes drop them right after their turn (the storage becomes an unwritten memory
  mapping of the same shape and dtype), keeping the module structure and the bitsandbytes quantization
  constants, which are not parameters and are never partitioned.
- `partition_from_rank0`: once every process has loaded, the model is partitioned parameter by parameter
  (DeepSpeed's `zero.Init(module=...)`). Left to `deepspeed.initialize`, the engine would first broadcast the
  whole unpartitioned model (every process then holds a whole copy again) and only then partition it
  (docs/platform.md, "4-bit loading in turns, measured").
"""
from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import time
from dataclasses import dataclass
from typing import Callable, List, TypeVar

import torch

from ..backends import coordination

logger = logging.getLogger(__name__)
T = TypeVar("T")
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


class LoadError(RuntimeError):
    """Loading failed on some process; raised on every process together, naming the ones that failed."""


@dataclass(frozen=True)
class LoadTurn:
    """When this process loaded: its turn of `turns`, and wall-clock start and end (time.time())."""

    turn: int
    turns: int
    started: float
    finished: float


_turns_taken: List[LoadTurn] = []


def turns_taken() -> List[LoadTurn]:
    """This process's loads through `load_in_turns`, oldest first (the tests check that they do not overlap)."""
    return list(_turns_taken)


def local_rank_and_size() -> tuple:
    """(this process's index on its node, processes on its node) from the launcher's variables. Without a
    node size every process counts as one node's (turns are then global: slower, never unbounded)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for name in LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "").split("(")[0]  # SLURM writes e.g. "8(x4)"
        if value.isdigit() and int(value) > local_rank:
            return local_rank, int(value)
    if coordination.is_distributed():
        return coordination.rank(), coordination.world_size()
    return 0, 1


def load_in_turns(load: Callable[[], T], what: str = "the model", at_once: int = 1) -> T:
    """`load()` on every process, `at_once` processes per node at a time (default one); returns its result. Call
    on every process.

    Every process enters the same number of turns (the largest node's, agreed by an all-reduce), each ending with
    an all-reduce; an exception in `load` on any process makes every process raise `LoadError` after that turn
    (the failing process chains its own exception)."""
    local_rank, local_size = local_rank_and_size()
    turns = _largest_over_processes(turns_for(local_size, at_once))
    mine = turn_of(local_rank, turns, at_once)
    result, failure = None, None
    for turn in range(turns):
        if turn == mine:
            started = time.time()
            try:
                with large_blocks_mapped():
                    result = load()
            except Exception as e:  # shared below, so no process waits in the next turn
                failure = e
            _turns_taken.append(LoadTurn(turn, turns, started, time.time()))
        failed = _failed_ranks(failure is not None)
        if failed:
            raise LoadError(f"Loading {what} failed on process(es) {failed} (in turn {turn + 1} of {turns}); "
                            f"{'this process: ' + repr(failure) if failure else 'see their output'}.") from failure
    return result


def turns_for(local_size: int, at_once: int) -> int:
    """How many turns a node of `local_size` processes needs when `at_once` of them load together."""
    if at_once < 1:
        raise ValueError(f"at_once={at_once}: at least one process per node must load at a time")
    return -(-local_size // at_once)


def turn_of(local_rank: int, turns: int, at_once: int) -> int:
    """The turn (0-based, of `turns`) in which local rank `local_rank` loads: local ranks 0 .. at_once-1 load in
    the last turn (global rank 0, whose copy is kept, last), the next `at_once` in the turn before, and so on."""
    return turns - 1 - local_rank // at_once


def _largest_over_processes(value: int) -> int:
    """The largest `value` over all processes (how many turns every process must take)."""
    return int(_all_reduce([value], "MAX")[0]) if coordination.is_distributed() else value


def _failed_ranks(failed_here: bool) -> List[int]:
    """The global ranks whose load failed (a SUM all-reduce of one flag per process; every process enters it)."""
    if not coordination.is_distributed():
        return [0] if failed_here else []
    flags = [0] * coordination.world_size()
    flags[coordination.rank()] = int(failed_here)
    return [r for r, flag in enumerate(_all_reduce(flags, "SUM")) if flag]


def _all_reduce(values: List[int], op: str) -> List[int]:
    """All-reduce integers over the process group coordination.py follows (DeepSpeed's, else torch's)."""
    return coordination.all_reduce_ints(values, op)


def drop_weights_rank0_will_send(model: torch.nn.Module) -> int:
    """Drop this process's loaded weights when partitioning will overwrite them with global rank 0's (every
    process but rank 0 of a multi-process job); returns the bytes dropped (0 on rank 0 and alone).

    Each parameter keeps its object, shape, dtype, device and attributes (a bitsandbytes weight keeps its
    quantization constants); only its storage becomes a memory mapping nobody has written, which the operating
    system backs with memory only when DeepSpeed's broadcast writes it, one parameter at a time, right before
    partitioning it (`partition_from_rank0`). Until then the weights are not the model's. Host tensors only."""
    if not coordination.is_distributed() or coordination.rank() == 0:
        return 0
    dropped = 0
    for param in model.parameters():  # each shared (tied) parameter once
        if param.device.type != "cpu" or hasattr(param, "ds_numel"):  # on a GPU: not host memory; partitioned
            continue
        dropped += param.numel() * param.element_size()
        param.data = untouched_like(param.data)
    _return_freed_memory()
    return dropped


def partition_from_rank0(model: torch.nn.Module, ds_config: dict, dtype: torch.dtype) -> None:
    """ZeRO-3-partition `model` now, on every process together (a collective per parameter): DeepSpeed's public
    `zero.Init(module=...)` broadcasts each parameter from rank 0 and keeps this process's shard, freeing the whole
    tensor before the next one. `deepspeed.initialize` then finds a partitioned model, as after a ZeRO-3 load of
    an unquantized model, and neither broadcasts the whole model again nor partitions it a second time
    (docs/platform.md, "4-bit loading in turns, measured")."""
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, dtype=dtype)
    _return_freed_memory()


def untouched_like(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of `tensor`'s shape and dtype over its own anonymous memory mapping, which the kernel backs with
    memory only page by page as it is written (torch.empty_like would reuse heap pages the load left resident)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return torch.empty_like(tensor)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape)


M_MMAP_THRESHOLD = -3            # glibc's mallopt parameter
GLIBC_LARGEST_DYNAMIC_THRESHOLD = 32 * 2 ** 20  # where glibc's own (dynamic) threshold ends up after large frees


@contextlib.contextmanager
def large_blocks_mapped(threshold: int = 2 ** 20):
    """While loading, glibc serves every block of `threshold` bytes or more from its own memory mapping, which
    goes back to the system the moment it is freed. Quantizing on the CPU makes a 16-bit copy of each weight
    and frees it; left in the heap, those copies made a process's peak 1.1-3.1 times the 4-bit model instead of
    about once (docs/platform.md, "4-bit loading in turns, measured"). Afterwards the threshold is set to
    32 MiB, the value glibc's dynamic threshold reaches once large blocks have been freed, as loading does."""
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_LARGEST_DYNAMIC_THRESHOLD)


def _glibc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give freed memory back to the operating system: glibc keeps freed heap blocks (the load's transient
    copies) resident otherwise."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
