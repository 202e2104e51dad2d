"""BeamLoRALinear split for tensor parallelism (beamlora_ds/backends/tensor_parallel.py), in plain torch.distributed
on 2 gloo processes: a column-parallel layer followed by a row-parallel one (an MLP's up and down projections,
uneven split 7 + 5) gives the unsplit pair's output, and every adapter gradient equals the unsplit one (the split
factor's gradient equals the matching slice). No DeepSpeed: the bases are split by hand here; the DeepSpeed AutoTP
path is tested in tests/distributed/test_tensor_parallel.py."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from beamlora_ds import testing
from beamlora_ds.method.layer import BeamLoRALinear
from beamlora_ds.method.layer import COLUMN, ROW
from beamlora_ds.backends.tensor_parallel import TensorParallelSplit, copy_to_group, reduce_from_group

SIZES = (7, 5)  # the hidden features of the MLP, split unevenly as GQA splits can be


class ColumnBase(nn.Module):
    """The output features split: each process computes its slice from the whole input."""

    def __init__(self, full: nn.Linear, split: TensorParallelSplit):
        super().__init__()
        rows = slice(split.offset, split.offset + split.local_size)
        self.weight = nn.Parameter(full.weight.detach()[rows].clone(), requires_grad=False)
        self.bias = nn.Parameter(full.bias.detach()[rows].clone(), requires_grad=False)
        self.group = split.group

    def forward(self, x):
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowBase(nn.Module):
    """The input features split: each process multiplies its slice, the parts are summed."""

    def __init__(self, full: nn.Linear, split: TensorParallelSplit):
        super().__init__()
        cols = slice(split.offset, split.offset + split.local_size)
        self.weight = nn.Parameter(full.weight.detach()[:, cols].clone(), requires_grad=False)
        self.bias = nn.Parameter(full.bias.detach().clone(), requires_grad=False)
        self.group = split.group

    def forward(self, x):
        return reduce_from_group(F.linear(x, self.weight), self.group) + self.bias


def reference_pair():
    torch.manual_seed(0)
    up = BeamLoRALinear(nn.Linear(16, sum(SIZES)), r=4, alpha=8.0, tau=0.5)
    down = BeamLoRALinear(nn.Linear(sum(SIZES), 16), r=4, alpha=8.0, tau=0.5)
    with torch.no_grad():  # B and score away from their zero init, so every gradient path carries something
        for layer in (up, down):
            layer.lora_B.normal_()
            layer.lora_score.normal_()
    return up, down


def run(up, down, x, target):
    loss = (down(F.gelu(up(x))) * target).sum()
    loss.backward()
    return loss.detach()


def worker(rank, port, world):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        up, down = reference_pair()
        x, target = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
        split_up, split_down = copy.deepcopy(up), copy.deepcopy(down)
        expected = run(up, down, x, target)

        group = dist.new_group([0, 1])
        column = TensorParallelSplit(COLUMN, group, SIZES, rank)
        row = TensorParallelSplit(ROW, group, SIZES, rank)
        split_up.split_for_tensor_parallel(column, ColumnBase(up.base_layer, column))
        split_down.split_for_tensor_parallel(row, RowBase(down.base_layer, row))
        assert split_up.lora_B.shape == (SIZES[rank], 4) and split_up.lora_A.shape == (4, 16)
        assert split_down.lora_A.shape == (4, SIZES[rank]) and split_down.lora_B.shape == (16, 4)
        loss = run(split_up, split_down, x, target)

        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        mine = slice(column.offset, column.offset + column.local_size)
        checks = {"up.lora_A": (split_up.lora_A.grad, up.lora_A.grad),
                  "up.lora_B": (split_up.lora_B.grad, up.lora_B.grad[mine]),
                  "up.lora_score": (split_up.lora_score.grad, up.lora_score.grad),
                  "down.lora_A": (split_down.lora_A.grad, down.lora_A.grad[:, mine]),
                  "down.lora_B": (split_down.lora_B.grad, down.lora_B.grad),
                  "down.lora_score": (split_down.lora_score.grad, down.lora_score.grad)}
        for name, (got, want) in checks.items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


def test_split_layers_equal_the_unsplit_pair():
    mp.spawn(worker, args=(testing.free_port(), 2), nprocs=2, join=True)


def test_dropout_is_refused_under_tensor_parallelism():
    layer = BeamLoRALinear(nn.Linear(8, 8), r=2, alpha=4.0, dropout=0.1)
    split = TensorParallelSplit(COLUMN, None, (4, 4), 0)
    with pytest.raises(ValueError, match="dropout.*Set dropout to 0"):
        layer.split_for_tensor_parallel(split, nn.Linear(8, 4))


def test_split_sizes_must_add_up_to_the_layer():
    layer = BeamLoRALinear(nn.Linear(8, 6), r=2, alpha=4.0)
    with pytest.raises(ValueError, match="add up to 5.*6 features"):
        layer.split_for_tensor_parallel(TensorParallelSplit(COLUMN, None, (3, 2), 0), nn.Linear(8, 3))


def test_a_controller_state_from_another_tensor_parallel_split_is_refused():
    """Optimizer and model files are per slice: a resume must have the same split (checkpointing/load.py
    checks the same before DeepSpeed reads anything)."""
    from helpers import TwoLayerNet

    from beamlora_ds import BeamLoRAConfig, apply

    beam = apply(TwoLayerNet(), BeamLoRAConfig(r=4, alpha=8.0, total_steps=40, interval=8))
    state = beam.state_dict()
    assert state["tensor_parallel"] == {}
    state["tensor_parallel"] = {beam.module_names[0]: ["column", [2, 2]]}
    with pytest.raises(ValueError, match="another tensor-parallel split.*same tensor_parallel.autotp_size"):
        beam.load_state_dict(state)
