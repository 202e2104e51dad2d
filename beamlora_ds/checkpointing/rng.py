"""Every random stream a training step may draw from (dropout above all), saved with each process's checkpoint
state so that a resume repeats them."""
from __future__ import annotations

import random

import torch


def rng_state() -> dict:
    """Python's, torch's, numpy's (when installed) and CUDA's (when present) generator states."""
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
    """Put back the streams rng_state() saved (numpy and CUDA only where they were saved and are present)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
