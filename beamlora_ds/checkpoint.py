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
    """`engine.save_checkpoint` plus this process's BeamLoRA state; returns the tag. Call on every process."""
    tag = tag or f"global_step{engine.global_steps}"
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state or {})
    path = os.path.join(save_dir, tag, STATE_FILE.format(rank=_rank()))
    tmp = path + ".tmp"
    torch.save({"beamlora": beam.state_dict(), "rng": rng_state()}, tmp)
    os.replace(tmp, path)
    _barrier()
    return tag


def load_checkpoint(engine, beam: BeamController, load_dir: str, tag: Optional[str] = None) -> Tuple[str, dict]:
    """`engine.load_checkpoint` plus the BeamLoRA state of this process; returns (path, client_state)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"No checkpoint to resume in {load_dir!r}: it has no 'latest' file.")
        with open(latest) as f:
            tag = f.read().strip()
    state_path = os.path.join(load_dir, tag, STATE_FILE.format(rank=_rank()))
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{state_path} is missing: the checkpoint {tag!r} was not written by "
                                "beamlora_ds.save_checkpoint with this number of processes.")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag!r} from {load_dir!r}.")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    beam.load_state_dict(state["beamlora"])
    set_rng_state(state["rng"])
    return path, client_state


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


def _barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()
