"""BeamLoRA on megatron-core's parallel linear layers: which layers, how the adapter is split, and its collectives.

Megatron's `ColumnParallelLinear` / `RowParallelLinear` (the local layer spec's; Transformer Engine's linears are
refused for now: their attributes differ, and they cannot be tested without a GPU) are adapted in the layout used
under DeepSpeed AutoTP: the rank dimension is never split (docs/tensor_parallel.md). A column base keeps A and
the score replicated and splits B on the output; a row base splits A on the input and keeps B replicated.

Under sequence parallelism a replicated factor sees only this process's part of the sequence:
    column base: h_k = w * (A x_k) on the local tokens, all-gathered along the sequence before B_k (backward:
        reduce-scatter, which sums dL/dh over the group); A's and the score's gradients are partial sums;
    row base: the partial products A_k x_k are reduce-scattered along the sequence (the base's output is too), so
        B and the score see local tokens only and their gradients are partial sums.
The partial gradients are summed over the tensor-parallel group by Megatron's own `finalize_model_grads`, which
sums every parameter marked `sequence_parallel` (as it does for layer norms): the factor and the score table are
marked. A fused `linear_qkv` or `linear_fc1` is one adapter (one A, one B over the fused output).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

from ...method.config import BeamLoRAConfig
from ...method.inject import matches_target
from ...method.layer import COLUMN, ROW, BeamLoRALinear
from ...method.score_table import attach_score_table
from .. import coordination
from ..tensor_parallel import TensorParallelSplit

PARALLEL_LINEARS = "megatron-core's ColumnParallelLinear / RowParallelLinear"


def parallel_kind(module: nn.Module):
    """COLUMN or ROW for a Megatron parallel linear layer (by its attributes: megatron and TE alike), else None."""
    if not all(hasattr(module, name) for name in ("input_size", "output_size", "tp_group")):
        return None
    if hasattr(module, "output_size_per_partition"):
        return COLUMN
    if hasattr(module, "input_size_per_partition"):
        return ROW
    return None


def is_transformer_engine(module: nn.Module) -> bool:
    """Megatron's Transformer Engine linears (TELinear, TEColumnParallelLinear, TELayerNormColumnParallelLinear, ...)
    by their module, never importing them."""
    return any(cls.__module__.startswith(("megatron.core.extensions.transformer_engine", "transformer_engine"))
               for cls in type(module).__mro__)


def is_megatron_model(model: nn.Module) -> bool:
    """True when `model` holds Megatron parallel linear layers (apply() then wraps them with this backend)."""
    return any(parallel_kind(m) is not None or is_transformer_engine(m) for m in model.modules())


@dataclass(frozen=True)
class MegatronSplit(TensorParallelSplit):
    """The split of a Megatron parallel layer, with Megatron's own collectives; under sequence parallelism the
    replicated side of the adapter works on the local part of the sequence (module docstring)."""

    sequence_parallel: bool = False

    def copy_to_group(self, h: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp

        if self.sequence_parallel:
            return mtp.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.group)
        return mtp.copy_to_tensor_model_parallel_region(h, group=self.group)

    def reduce_from_group(self, h: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp

        if self.sequence_parallel:
            return mtp.reduce_scatter_to_sequence_parallel_region(h, group=self.group)
        return mtp.reduce_from_tensor_model_parallel_region(h, group=self.group)


class BeamLoRAParallelLinear(BeamLoRALinear):
    """A BeamLoRALinear on a Megatron parallel base: the same adapter, Megatron's call convention (the base and this
    layer return `(output, bias)`; the adapter adds to the output only)."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(x, *args, **kwargs)
        return output + self.adapter_output(x).to(output.dtype), bias


def split_of(module: nn.Module, kind: str) -> MegatronSplit:
    """How `module` is split over its tensor-parallel group (Megatron splits evenly)."""
    group = module.tp_group
    world, index = group.size(), group.rank()
    full = module.output_size if kind == COLUMN else module.input_size
    if full % world:
        raise ValueError(f"{full} features do not split evenly over {world} tensor-parallel processes.")
    return MegatronSplit(kind=kind, group=group, sizes=(full // world,) * world, index=index,
                         sequence_parallel=bool(getattr(module, "sequence_parallel", False)))


def whole_model_name(model: nn.Module, name: str) -> str:
    """`name` with the whole model's layer number: under pipeline parallelism a stage (or a virtual pipeline chunk)
    numbers its `decoder.layers` from 0, while each TransformerLayer knows its place in the whole model
    (`layer_number`, from 1). Targets are matched, A is seeded and modules are named by this name, so every
    pipeline layout has the one-process model's names and adapter."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            number = getattr(model.get_submodule(".".join(parts[: i + 1])), "layer_number", None)
            if number is not None:
                parts[i] = str(int(number) - 1)
            break
    return ".".join(parts)


def check_megatron_targets(model: nn.Module, config: BeamLoRAConfig, allow_none: bool = False
                           ) -> List[Tuple[str, str, nn.Module, str]]:
    """(local name, whole-model name, layer, kind) of every target; refuses context parallelism, names that match
    nothing (`allow_none`: a pipeline chunk may hold none), layers that are not Megatron parallel linears, a fused
    layer-norm linear, and layouts the adapter cannot follow."""
    check_parallelism(getattr(model, "config", None))
    matched = [(name, whole, m) for name, m in model.named_modules()
               if name and matches_target(whole := whole_model_name(model, name), config.target_modules)]
    if not matched and allow_none:
        return []
    if not matched:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if parallel_kind(m) is not None})
        raise ValueError(f"target_modules={config.target_modules!r} matched no module. Megatron layers BeamLoRA can "
                         f"wrap in this model are named: {names}.")
    found = []
    for local_name, name, module in matched:
        kind = parallel_kind(module)
        if is_transformer_engine(module):
            raise TypeError(f"{name} is Transformer Engine's {type(module).__name__}: not supported yet (its "
                            "attributes differ from Megatron's layers and it is untested without a GPU). Build the "
                            "model with the local layer spec (get_gpt_layer_local_spec), whose linears BeamLoRA "
                            "adapts.")
        if kind is None:
            raise TypeError(f"{name} ({type(module).__name__}) is not one of {PARALLEL_LINEARS}; narrow "
                            "target_modules to the parallel linear layers.")
        if kind == COLUMN and getattr(module, "gather_output", False):
            raise ValueError(f"{name} gathers its output (gather_output=True); BeamLoRA adapts column-parallel layers "
                             "whose output stays split, as in Megatron's GPT.")
        if kind == ROW and not getattr(module, "input_is_parallel", True):
            raise ValueError(f"{name} scatters its own input (input_is_parallel=False); BeamLoRA adapts "
                             "row-parallel layers fed a split input, as in Megatron's GPT.")
        if config.r > min(module.input_size, module.output_size):
            raise ValueError(f"r={config.r} is larger than the smaller dimension of {name} "
                             f"({module.input_size}->{module.output_size}). Lower r.")
        found.append((local_name, name, module, kind))
    return found


def check_parallelism(config) -> None:
    """Refuse what the Megatron backend does not support, before anything changes."""
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError("Context parallelism is not supported by BeamLoRA on Megatron (untested: the adapter's "
                         "gradients over the context-parallel group). Use context_parallel_size=1.")


def wrap_megatron_model(model, config: BeamLoRAConfig) -> Dict[str, BeamLoRAParallelLinear]:
    """apply() on a Megatron GPT, or on the list of model chunks a virtual pipeline builds per process: every
    chunk wrapped, one dict by whole-model name. Under pipeline parallelism the targets of every chunk are checked
    first and a problem on any process is raised on all (collective), so that no stage is left waiting; every
    stage must hold a target (each takes part in the whole model's reset)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    pipeline = any(getattr(getattr(c, "config", None), "pipeline_model_parallel_size", 1) > 1 for c in chunks)
    if pipeline or len(chunks) > 1:  # the same on every process
        problem = None
        try:
            if not sum(len(check_megatron_targets(c, config, allow_none=True)) for c in chunks):
                raise ValueError(f"target_modules={config.target_modules!r} matched no module of pipeline stage "
                                 f"{pipeline_rank()}: under pipeline parallelism every stage takes part in the whole "
                                 "model's reset and must hold BeamLoRA modules; target projections every layer has.")
        except (TypeError, ValueError) as error:
            problem = error
        coordination.raise_first_error(problem)
    wrapped: Dict[str, BeamLoRAParallelLinear] = {}
    for chunk in chunks:
        wrapped.update(wrap_megatron_targets(chunk, config, allow_none=len(chunks) > 1))
    return wrapped


def megatron_beamlora_modules(model) -> Dict[str, BeamLoRAParallelLinear]:
    """Every BeamLoRA module of a Megatron GPT (wrapped or not) or of this process's list of virtual pipeline
    chunks, by whole-model name (whole_model_name), in module order."""
    from ..wrappers import unwrap_model

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    found: Dict[str, BeamLoRAParallelLinear] = {}
    for chunk in map(unwrap_model, chunks):  # Megatron's DDP and Float16Module unwrapped
        found.update({whole_model_name(chunk, name): m for name, m in chunk.named_modules()
                      if isinstance(m, BeamLoRALinear)})
    return found


def pipeline_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank()


def wrap_megatron_targets(model: nn.Module, config: BeamLoRAConfig, allow_none: bool = False
                          ) -> Dict[str, BeamLoRAParallelLinear]:
    """Replace every target Megatron parallel linear in `model` (in place) by a BeamLoRAParallelLinear, freeze the
    rest, and put the scores in one table; keyed by whole-model name (whole_model_name). A is initialised from a
    generator seeded by the config's seed and that name, so every tensor-parallel, data-parallel and pipeline
    layout starts from the same adapter. `allow_none`: a virtual pipeline chunk may hold no target."""
    targets = check_megatron_targets(model, config, allow_none)
    if config.dropout and any(m.tp_group.size() > 1 for _, _, m, _ in targets):
        raise ValueError("LoRA dropout under tensor parallelism is not supported (the processes of a group would "
                         "draw different masks for the same input). Set dropout to 0.")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: Dict[str, BeamLoRAParallelLinear] = {}
    for local_name, name, module, kind in targets:
        layer = BeamLoRAParallelLinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout, tau=config.tau,
                                       features=(module.input_size, module.output_size))
        layer.seed_lora_A(config.seed, name)
        split = split_of(module, kind)
        if split.world_size > 1:
            layer.split_for_tensor_parallel(split, module)
            mark_split_factor(getattr(layer, split.split_factor), split)
            if split.sequence_parallel:  # the replicated factor's gradient is a partial sum (module docstring)
                replicated = layer.lora_A if kind == COLUMN else layer.lora_B
                replicated.sequence_parallel = True
        parent_name, _, child = local_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        wrapped[name] = layer
    if not wrapped:
        return wrapped
    table = attach_score_table(model, wrapped)
    if any(m.tensor_parallel is not None and m.tensor_parallel.sequence_parallel for m in wrapped.values()):
        table.lora_score.sequence_parallel = True
    return wrapped


def mark_split_factor(param: nn.Parameter, split: MegatronSplit) -> None:
    """Megatron's attributes of a tensor-parallel parameter (gradient norms count it once per group, checkpoints
    know its partition)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, True, split.split_dim, 1)


def parallel_layout() -> Dict[str, int]:
    """This process's place in Megatron's process groups (what a checkpoint must be resumed in)."""
    from megatron.core import parallel_state as ps

    layout = {"world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "tensor_parallel_rank": ps.get_tensor_model_parallel_rank(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "pipeline_parallel_rank": ps.get_pipeline_model_parallel_rank(),
            "data_parallel": ps.get_data_parallel_world_size(),
            "data_parallel_rank": ps.get_data_parallel_rank()}
    virtual = ps.get_virtual_pipeline_model_parallel_world_size()
    if virtual:  # only then: checkpoints without a virtual pipeline keep the layout they were written with
        layout["virtual_pipeline"] = virtual
    return layout
