"""The platforms BeamLoRA trains on, behind the seam of `method/seam.py`: a plain torch optimizer (also plain DDP),
DeepSpeed (ZeRO 0-3, AutoTP) in `deepspeed/`, megatron-core (its parallel layers and optimizers) in `megatron/`;
what they share (flat runs of rank slots, fragment access, tensor-parallel collectives, process coordination) at
this level. A new backend is a folder beside `deepspeed/` and one more case
in `select_access` and `Backends`."""
from __future__ import annotations

from typing import Optional, Sequence

from ..method.layer import BeamLoRALinear
from ..method.seam import Platform, PlatformAccess
from . import coordination
from .deepspeed.zero_access import access_for_engine, engine_steps
from .megatron.access import MegatronAccess, megatron_steps
from .megatron.internals import is_megatron_optimizer
from .torch_access import TorchAccess, adam_steps, optimizers_holding
from .wrappers import is_deepspeed_engine


def select_access(modules: Sequence[BeamLoRALinear], optimizer_or_engine) -> PlatformAccess:
    """The seam for whatever `beam.step()` is given: a DeepSpeed engine (ZeRO 0-3), a megatron-core optimizer, or
    a torch optimizer (or a wrapper holding one in `.optimizer`, as accelerate's)."""
    if is_deepspeed_engine(optimizer_or_engine):
        return access_for_engine(modules, optimizer_or_engine)
    if is_megatron_optimizer(optimizer_or_engine):
        return MegatronAccess(modules, optimizer_or_engine)
    return TorchAccess(modules, optimizer_or_engine)


class Backends(Platform):
    """The platforms this package knows, as the controller asks for them (method/seam.py)."""

    def access(self, modules, optimizer_or_engine) -> PlatformAccess:
        return select_access(modules, optimizer_or_engine)

    def optimizer_steps(self, optimizer_or_engine, modules) -> Optional[int]:
        if is_deepspeed_engine(optimizer_or_engine):
            return engine_steps(optimizer_or_engine)
        if is_megatron_optimizer(optimizer_or_engine):
            return megatron_steps(optimizer_or_engine, modules)
        return adam_steps(optimizer_or_engine, modules)

    def process_place(self) -> dict:
        return {"rank": coordination.rank(), "world_size": coordination.world_size()}

    def optimizer_holding(self, parameters):
        holders = optimizers_holding(parameters)
        return holders[0] if len(holders) == 1 else None


BACKENDS = Backends()
