"""One (modules x r) score parameter for every BeamLoRALinear of a model, its rank weights computed once per forward.

Each module's rank weights are `w = r * softmax(score / tau)` (docs/method.md section 1). Computing them module by
module costs a softmax, a handful of autograd nodes, a gradient hook and (under ZeRO-1/2) a gradient reduction per
module; `apply()` instead gives the model one `ScoreTable` (attribute `beamlora_scores`, parameter
`beamlora_scores.lora_score`). The first module that asks in a forward computes all rows at once (one autograd
node); each module then multiplies by its own row, so a backward adds one row gradient per module and reaches the
table once (docs/fused_score_design.md).

When the rows are recomputed: on a module's second request (a new forward, including the recomputation of
non-reentrant gradient checkpointing, which then builds a graph it throws away), when grad mode changed, and when
the parameter was written in place (an optimizer step, a reset). The softmax keeps its output on its context, not
in saved tensors, so each segment of re-entrant checkpointing may backward through the shared node.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

TABLE_ATTRIBUTE = "beamlora_scores"  # the model attribute apply() registers the table under


class TableRankWeights(torch.autograd.Function):
    """r * softmax(scores / tau) across each row, in fp32, cast back to the scores' dtype (docs/method.md 1)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: float) -> torch.Tensor:
        p = torch.softmax(scores.float() / tau, dim=-1)
        ctx.p, ctx.tau, ctx.dtype = p, tau, scores.dtype  # on ctx: a second backward through here stays valid
        return (scores.shape[-1] * p).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p = ctx.p
        grad_p = p.shape[-1] * grad.float()
        grad_scores = p * (grad_p - (grad_p * p).sum(dim=-1, keepdim=True)) / ctx.tau
        return grad_scores.to(ctx.dtype), None


class ScoreTable(nn.Module):
    """The scores of `num_modules` BeamLoRALinear modules, row i for the module given index i."""

    def __init__(self, num_modules: int, r: int, tau: float, dtype=None, device=None):
        super().__init__()
        self.r, self.tau = r, tau
        self.lora_score = nn.Parameter(torch.zeros(num_modules, r, dtype=dtype, device=device))
        self.forget_rows()

    def forward(self) -> torch.Tensor:
        """All rank weights, (modules x r). Called through the module so ZeRO-3 gathers a partitioned table."""
        return TableRankWeights.apply(self.lora_score, self.tau)

    def forget_rows(self) -> None:
        """Drop the cached rows (and the graph they hold); the next request computes them again."""
        self._rows, self._key, self._served = None, None, None

    def row(self, index: int) -> torch.Tensor:
        """Module `index`'s rank weights, from the rows of the current forward (computed on first request)."""
        key = (torch.is_grad_enabled(), self.lora_score._version)
        if self._rows is None or key != self._key or self._served[index]:
            self._rows, self._key = self().unbind(0), key
            self._served = bytearray(len(self._rows))
        self._served[index] = 1
        return self._rows[index]

    def __getstate__(self):
        """Copies and pickles leave the cached rows out: they are graph tensors deepcopy refuses, and per forward."""
        state = self.__dict__.copy()
        state.update(_rows=None, _key=None, _served=None)
        return state

    def extra_repr(self) -> str:
        return f"modules={self.lora_score.shape[0]}, r={self.r}, tau={self.tau}"


def attach_score_table(model: nn.Module, modules: Dict[str, nn.Module]) -> ScoreTable:
    """Give `model` one ScoreTable for `modules` (BeamLoRALinear by name, row order = this order) and register it as
    `model.beamlora_scores`."""
    if hasattr(model, TABLE_ATTRIBUTE):
        raise ValueError(f"The model already has an attribute {TABLE_ATTRIBUTE!r}; BeamLoRA registers its score "
                         "table under that name. Rename yours, or apply() once per model.")
    layers = list(modules.values())
    first = layers[0]
    dtypes = {layer.lora_score.dtype for layer in layers}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    table = ScoreTable(len(layers), first.r, first.tau, dtype=dtype, device=first.lora_score.device)
    for index, layer in enumerate(layers):
        layer.use_score_table(table, index)
    setattr(model, TABLE_ATTRIBUTE, table)
    return table


def detach_score_table(model: nn.Module) -> None:
    """Remove the model's score tables (one, or one per pipeline layer), once no BeamLoRA module reads them (after
    a merge)."""
    for module in list(model.modules()):
        if isinstance(getattr(module, TABLE_ATTRIBUTE, None), ScoreTable):
            delattr(module, TABLE_ATTRIBUTE)


def score_parameters(modules: Sequence[nn.Module]) -> List[nn.Parameter]:
    """The distinct parameters holding these BeamLoRALinear modules' scores, in module order: one (modules x r)
    table after apply(), one (r,) parameter per module for layers made on their own."""
    seen: Dict[int, nn.Parameter] = {}
    for module in modules:
        seen.setdefault(id(module.score_parameter), module.score_parameter)
    return list(seen.values())
