"""The platforms BeamLoRA trains on, behind the seam of `method/seam.py`: a plain torch optimizer (also plain DDP),
DeepSpeed (ZeRO 0-3, AutoTP) in `deepspeed/`; what they share (flat runs of rank slots, tensor-parallel
collectives, process coordination) at this level. A new backend is a folder beside `deepspeed/` and one more case
in `select_access`."""
from __future__ import annotations

from typing import Sequence

from ..method.layer import BeamLoRALinear
from ..method.seam import PlatformAccess
from .deepspeed.zero_access import access_for_engine
from .torch_access import TorchAccess
from .wrappers import is_deepspeed_engine


def select_access(modules: Sequence[BeamLoRALinear], optimizer_or_engine) -> PlatformAccess:
    """The seam for whatever `beam.step()` is given: a DeepSpeed engine (ZeRO 0-3), or a torch optimizer (or a
    wrapper holding one in `.optimizer`, as accelerate's)."""
    if is_deepspeed_engine(optimizer_or_engine):
        return access_for_engine(modules, optimizer_or_engine)
    return TorchAccess(modules, optimizer_or_engine)
