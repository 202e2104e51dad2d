"""DeepSpeed checkpoints that carry the BeamLoRA controller's state, so a resumed run continues exactly.

The controller's snapshot is per process under ZeRO (each keeps its own shard), so the state goes into one
file per data-parallel rank beside DeepSpeed's own files in the tag folder: `beamlora_state_rank{N}.pt`,
holding the controller's state_dict and this process's RNG states (dropout must repeat after a resume).
"""
from __future__ import annotations

import os
import random
from typing import Optional, Tuple

import torch

from .controller import BeamController

STATE_FILE = "beamlora_state_rank{rank}.pt"


def _rank() -> int:
    import deepspeed.comm as dist

    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(engine, beam: BeamController, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None) -> str:
    """`engine.save_checkpoint` plus this process's BeamLoRA state; returns the tag. Call on every process.

    Our file is written first, so that DeepSpeed's `latest` pointer (written by save_checkpoint) never names
    a tag without it.
    """
    tag = tag or f"global_step{engine.global_steps}"
    folder = os.path.join(save_dir, tag)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STATE_FILE.format(rank=_rank()))
    torch.save({"beamlora": beam.state_dict(), "rng": rng_state()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {})
    return tag


def load_checkpoint(engine, beam: BeamController, load_dir: str, tag: Optional[str] = None) -> Tuple[str, dict]:
    """`engine.load_checkpoint` plus the BeamLoRA state of this process; returns (path, client_state)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        _all_ranks_or_raise(os.path.isfile(latest), f"No checkpoint to resume in {load_dir!r}: it has no 'latest' file.")
        with open(latest) as f:
            tag = f.read().strip()
    state_path = os.path.join(load_dir, tag, STATE_FILE.format(rank=_rank()))
    _all_ranks_or_raise(os.path.isfile(state_path), f"{state_path} is missing on some process: the checkpoint {tag!r} "
                        "was not written by beamlora_ds.save_checkpoint with this number of processes.")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag!r} from {load_dir!r}.")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    beam.load_state_dict(state["beamlora"])
    set_rng_state(state["rng"])
    return path, client_state


def _all_ranks_or_raise(ok: bool, message: str) -> None:
    """Raise on every process when any process is not ok, so that none is left waiting in a collective."""
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        from deepspeed.accelerator import get_accelerator

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=get_accelerator().current_device_name())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        raise FileNotFoundError(message)


def rng_state() -> dict:
    """Every random stream a training step may draw from (dropout above all), so a resume repeats them."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
