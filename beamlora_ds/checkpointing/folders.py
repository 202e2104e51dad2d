"""Which process publishes checkpoint folders, and whether the output folder fits how they are published.

Without DeepSpeed's node-local storage, process 0 renames checkpoint folders and moves `latest`, so every process
must see the folder it writes in (a shared file system). With it, each node's first process publishes its node's
own folder, and nodes must not share one.
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import Tuple, Type

from ..backends import coordination

logger = logging.getLogger(__name__)

SHARED_CHECK = ".beamlora_shared_check-{nonce}-{rank}"


def check_shared_folder(folder: str, node_local: bool, error: Type[Exception] = ValueError) -> None:
    """Refuse, on every process, an output folder that does not fit how checkpoints are published (see the module
    docstring): each node's first process writes a probe file; every process says whose it sees."""
    if not coordination.is_distributed():
        return
    nonce = coordination.all_values(secrets.token_hex(8) if coordination.rank() == 0 else None)[0]
    writes = int(os.environ.get("LOCAL_RANK", coordination.rank())) == 0  # each node's first process
    probe = os.path.join(folder, SHARED_CHECK.format(nonce=nonce, rank=coordination.rank()))
    if writes:
        try:
            os.makedirs(folder, exist_ok=True)
            open(probe, "w").close()
        except OSError as e:  # not writable: said below by every process, none left waiting
            writes = False
            logger.warning("Cannot write into the output folder %r: %s", folder, e)
    writers = [r for r, w in enumerate(coordination.all_values(writes)) if w]  # also the barrier after the writes
    seen = [r for r in writers if os.path.exists(os.path.join(folder, SHARED_CHECK.format(nonce=nonce, rank=r)))]
    try:
        if node_local:
            ok, message = len(seen) <= 1, (
                f"DeepSpeed's node-local checkpoint storage is on, but the output folder {folder!r} is shared by the "
                "nodes: each node's first process would publish the same checkpoint folders. Remove "
                "\"use_node_local_storage\" from the ds_config's \"checkpoint\" section (a shared folder needs no "
                "node-local storage).")
        else:
            ok, message = 0 in seen, (
                f"The output folder {folder!r} is not shared by all processes: some process (on another node) does "
                "not see what process 0 wrote there. Checkpoints need one folder that every node sees (a shared file "
                'system), or DeepSpeed\'s node-local storage: add "checkpoint": {"use_node_local_storage": true} to '
                "the ds_config (each node then keeps its own processes' files and must resume on the same nodes).")
        coordination.all_ranks_or_raise(ok, message, error)
    finally:
        coordination.barrier()
        if writes:
            os.remove(probe)


def node_local_storage(engine) -> bool:
    """Whether `engine` keeps checkpoints per node (DeepSpeed's `checkpoint.use_node_local_storage`)."""
    return getattr(engine, "use_node_local_storage", lambda: False)()


def owns_folders(engine) -> bool:
    """The one process that renames checkpoint folders and moves `latest`: global rank 0 on a shared file
    system, each node's local rank 0 with DeepSpeed's node-local checkpoint storage."""
    if not coordination.is_distributed():
        return True
    return (engine.local_rank if node_local_storage(engine) else coordination.rank()) == 0


def reading_part(node_local: bool) -> Tuple[int, int]:
    """(index, count) of this process among those that share the reading of a checkpoint folder: every process
    on a shared file system; with node-local storage, the processes of this node (each node reads its own folder).
    """
    if node_local:
        index = int(os.environ.get("LOCAL_RANK", 0))
        count = int(os.environ.get("LOCAL_SIZE", 0)) or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or 0
        return (index, count) if count > index else (0, 1)
    return coordination.rank(), coordination.world_size()


def same_folder_as_owner(node_local: bool) -> int:
    """Which publisher's folder this process writes into: 0 on a shared file system, else its node's first rank."""
    return coordination.rank() - int(os.environ.get("LOCAL_RANK", 0)) if node_local else 0
