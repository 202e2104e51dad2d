"""BeamLoRALinear: a frozen base linear layer (nn.Linear, transformers Conv1D, bitsandbytes Linear4bit) plus a beam
of r scored rank-1 sub-solutions.

    y = W0 x + (alpha / r) * B (w * (A dropout(x))),   w = r * softmax(score / tau)

With score = 0 every w_i = 1 and the layer is exactly vanilla LoRA (docs/method.md section 1).
"""
from __future__ import annotations

import math
import re
import sys
import zlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


# How a tensor-parallel base splits its weight: column (output features) or row (input features). The split itself
# (sizes, group, the two collectives) belongs to the backend: split_for_tensor_parallel() takes any object with the
# attributes of beamlora_ds.backends.tensor_parallel.TensorParallelSplit (docs/tensor_parallel.md).
COLUMN, ROW = "column", "row"


def rank_weights(score: torch.Tensor, tau: float) -> torch.Tensor:
    """w = r * softmax(score / tau), always in fp32 so bf16 training cannot distort the ranking."""
    return score.shape[-1] * torch.softmax(score.float() / tau, dim=-1)


WRAPPABLE = "nn.Linear, transformers Conv1D (GPT-2 style) and bitsandbytes Linear4bit"


def _conv1d_class():
    """transformers' Conv1D class, or None. Never imports transformers: a model can only hold a Conv1D when
    `transformers.pytorch_utils` is already imported, so its absence means "no"."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2 style: weight stored `in x out`, the transpose of nn.Linear's)."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_conv1d_layout(module: nn.Module) -> bool:
    """True when the model's files store this layer's weight in x out (peft's `fan_in_fan_out`): a transformers
    Conv1D, or a bitsandbytes layer transformers quantized from one (it keeps that class in `source_cls`)."""
    conv1d, source = _conv1d_class(), getattr(module, "source_cls", None)
    from_conv1d = conv1d is not None and isinstance(source, type) and issubclass(source, conv1d)
    return is_conv1d(module) or from_conv1d


def is_wrappable(module: nn.Module) -> bool:
    """A layer BeamLoRALinear can wrap: an nn.Linear (bitsandbytes Linear4bit is one) or a transformers Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_features(base_layer: nn.Module) -> tuple:
    """(in_features, out_features) of a wrappable layer. A Conv1D names them `nx` and `nf` (its weight is
    `nx x nf`); read from those attributes, they stay right when ZeRO-3 has partitioned the weight."""
    if is_conv1d(base_layer):
        return int(base_layer.nx), int(base_layer.nf)
    try:
        return int(base_layer.in_features), int(base_layer.out_features)
    except AttributeError:
        raise TypeError(f"{type(base_layer).__name__} has no in_features/out_features; BeamLoRALinear wraps "
                        f"{WRAPPABLE} only") from None


def is_4bit_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` (NF4/FP4). Never imports bitsandbytes: a model can only hold one when
    bitsandbytes is already imported, so its absence means "no"."""
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


def _adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """The dtype the adapter is created in: the dtype the base layer computes in.

    A plain layer computes in its weight's dtype. A 4-bit layer's weight dtype is only the storage of its packed
    nibbles (uint8, or bf16/fp32 so ZeRO-3 can partition it): it computes in its `compute_dtype`, or in the
    input's dtype when none is set, so the adapter takes the compute dtype, else fp32.
    """
    if is_4bit_linear(base_layer):
        compute = getattr(base_layer, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32
    weight = getattr(base_layer, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


class BeamLoRALinear(nn.Module):
    """Wraps `base_layer` (kept frozen) with trainable `lora_A` (r x in), `lora_B` (out x r), `lora_score` (r).

    The shapes are the same for every base type: for a Conv1D base only the base's own weight is transposed.
    `fan_in_fan_out` (peft's name) records that the model stores the base weight in x out, for adapter_config.json.

    A layer made on its own owns its score parameter. `apply()` moves the scores of all its layers into one
    model-level table (`use_score_table`, docs/fused_score_design.md); `lora_score` then reads and writes this
    layer's row of it (a view), and `score_parameter` / `score_row` name where the values live."""

    _score_table = None  # the model's ScoreTable once apply() attached one (kept out of the module tree)
    _score_index = None
    tensor_parallel = None  # the split once split_for_tensor_parallel() split this layer

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, tau: float = 0.05,
                 features: Optional[Tuple[int, int]] = None):
        super().__init__()
        # `features`: the unsplit (in, out) of a base that names them otherwise (a backend's parallel layer)
        in_features, out_features = features if features is not None else base_features(base_layer)
        if r > min(in_features, out_features):
            raise ValueError(f"r={r} exceeds min(in_features={in_features}, out_features={out_features}) of this "
                             "layer: a rank above that adds parameters but no capacity. Lower r.")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = is_conv1d_layout(base_layer)
        self.r, self.alpha, self.tau = r, alpha, tau
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base_weight = getattr(base_layer, "weight", None)
        factory = dict(dtype=_adapter_dtype(base_layer),
                       device=base_weight.device if base_weight is not None else None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.lora_score = nn.Parameter(torch.zeros(r, **factory))
        self.reset_adapter_parameters()
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def reset_adapter_parameters(self) -> None:
        """A as nn.Linear's default init (kaiming-uniform, a=sqrt(5)), B = 0, score = 0: vanilla LoRA at step 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.zeros_(self.lora_score)

    @torch.no_grad()
    def seed_lora_A(self, seed: int, name: str) -> None:
        """A drawn as in reset_adapter_parameters, from a generator seeded by the run's seed and the layer's name: the
        same A in every parallel layout (a pipeline stage does not draw the layers of the stages before it)."""
        generator = torch.Generator().manual_seed(layer_seed(seed, name))
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(a)

    @property
    def lora_score(self) -> torch.Tensor:
        """This layer's r score logits: its own parameter, or (after apply()) a view of its row of the table."""
        own = self._own_score()
        return own if own is not None else self._score_table.lora_score[self._score_index]

    @property
    def score_parameter(self) -> nn.Parameter:
        """The parameter that holds this layer's score: its own (r,), or the model's (modules x r) table."""
        own = self._own_score()
        return own if own is not None else self._score_table.lora_score

    @property
    def score_row(self):
        """This layer's row in `score_parameter`, or None when the layer owns its score."""
        return None if self._score_table is None else self._score_index

    def _own_score(self):
        """The layer's own score parameter, None once it uses a table. A registered parameter is found by
        nn.Module's attribute lookup, which this class's property of the same name comes before."""
        return nn.Module.__getattr__(self, "lora_score") if self._score_table is None else None

    def use_score_table(self, table, index: int) -> None:
        """Keep this layer's score in row `index` of `table` (its current values move there) instead of its own
        parameter: the rank weights then come from the table's once-per-forward computation."""
        own = self._own_score()
        if own is None:
            raise ValueError("This BeamLoRALinear already uses a score table.")
        if table.r != self.r or table.tau != self.tau:
            raise ValueError(f"The score table has r={table.r}, tau={table.tau}; this layer r={self.r}, "
                             f"tau={self.tau}. One table serves layers of one BeamLoRAConfig.")
        with torch.no_grad():
            table.lora_score[index].copy_(own)
        delattr(self, "lora_score")  # the parameter leaves the module (nn.Module.__delattr__)
        self.__dict__["_score_table"], self.__dict__["_score_index"] = table, index  # not a submodule

    def rank_weights(self) -> torch.Tensor:
        if self._score_table is not None:
            return self._score_table.row(self._score_index)
        return rank_weights(self.lora_score, self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.adapter_output(x).to(result.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) B (w * (A x)): what the adapter adds to the base's output, in the adapter's dtype."""
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)
        split = self.tensor_parallel
        if split is not None and split.kind == ROW:  # each process multiplied its slice of x: sum the parts
            h = split.reduce_from_group(h)
        h = h * self.rank_weights().to(h.dtype)
        if split is not None and split.kind == COLUMN:  # each process's B slice sees h: their gradients add up
            h = split.copy_to_group(h)
        return F.linear(h, self.lora_B) * self.scaling

    @property
    def local_in_features(self) -> int:
        """Columns of this process's lora_A: its slice of the input on a row-parallel base, else in_features."""
        split = self.tensor_parallel
        return split.local_size if split is not None and split.kind == ROW else self.in_features

    @property
    def local_out_features(self) -> int:
        """Rows of this process's lora_B: its slice of the output on a column-parallel base, else out_features."""
        split = self.tensor_parallel
        return split.local_size if split is not None and split.kind == COLUMN else self.out_features

    def split_for_tensor_parallel(self, split, base_layer: nn.Module) -> None:
        """Put this layer on a tensor-parallel base: `base_layer` replaces the base (already split as `split`
        says), and the adapter factor on the split side keeps only this process's slice (B's rows on a column
        base, A's columns on a row base); the rank dimension and the score are never split
        (docs/tensor_parallel.md)."""
        if self.tensor_parallel is not None:
            raise ValueError("This BeamLoRALinear is already split for tensor parallelism.")
        if not isinstance(self.lora_dropout, nn.Identity):
            raise ValueError("LoRA dropout under tensor parallelism is not supported: the processes of a tensor-"
                             "parallel group would draw different masks for the same replicated input, and the "
                             "replicated adapter would drift apart. Set dropout to 0.")
        full = self.out_features if split.kind == COLUMN else self.in_features
        if sum(split.sizes) != full:
            raise ValueError(f"The split sizes {split.sizes} add up to {sum(split.sizes)}, but this layer's "
                             f"{'output' if split.kind == COLUMN else 'input'} has {full} features.")
        factor = getattr(self, split.split_factor)
        local = factor.detach().narrow(split.split_dim, split.offset, split.local_size).clone()
        factor.data = local  # the same Parameter object: optimizers and hooks that hold it stay valid
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.tensor_parallel = split

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, tau={self.tau}")


def layer_seed(seed: int, name: str) -> int:
    """A seed for one layer's A from the run's seed and the layer's name without wrappers' `module.` prefixes (the
    same layer gets the same A in every tensor-, data- and pipeline-parallel layout)."""
    plain = re.sub(r"^(module\.)+", "", name)
    return zlib.crc32(f"{int(seed)}:{plain}".encode())
