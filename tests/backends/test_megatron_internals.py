"""The megatron-core names BeamLoRA relies on (beamlora_ds/backends/megatron/internals.py, docs/platform.md
"megatron-core internals"), read from the installed source without importing megatron: an upgrade that renames or
reshapes one fails here, naming the function that uses it, instead of as a wrong reset deep in a run."""
import importlib.metadata
import importlib.util
import os

import pytest

SPEC = importlib.util.find_spec("megatron.core") if importlib.util.find_spec("megatron") else None
pytestmark = pytest.mark.skipif(SPEC is None, reason="megatron-core is not installed")
SITE = os.path.dirname(os.path.dirname(os.path.dirname(SPEC.origin))) if SPEC else None  # holds megatron/
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source(relative: str) -> str:
    """A file of the installed megatron-core, by its path from the folder holding the `megatron` package."""
    with open(os.path.join(SITE, relative)) as f:
        return f.read()


DISTRIB, OPTIMIZER = "megatron/core/optimizer/distrib_optimizer.py", "megatron/core/optimizer/optimizer.py"
# (file of megatron-core, text it must contain, the function of internals.py or the module that relies on it)
RELIED_ON = [
    (DISTRIB, "def _get_model_param_range_map(self, param", "owned_range"),
    (DISTRIB, '"param": sub_param_range', "owned_range (the 'param' range: p.view(-1))"),
    (DISTRIB, "self.model_param_group_index_map", "is_distributed, holds, main_param"),
    (DISTRIB, 'main_param = self.optimizer.param_groups[group_index]["params"][group_order]',
     "main_param (the fp32 shard at (group, position) of model_param_group_index_map)"),
    (DISTRIB, "self.data_parallel_group = data_parallel_group", "data_parallel_group"),
    (OPTIMIZER, "param.main_param = main_param", "main_param (the plain bf16 optimizer's copy)"),
    (OPTIMIZER, "self.optimizer.state[main_param] = self.optimizer.state.pop(param)",
     "state_of (the plain bf16 optimizer's state is keyed by the main copy)"),
    (OPTIMIZER, "self.grad_scaler = grad_scaler", "has_loss_scaler"),
    (OPTIMIZER, "def __init__(self, chained_optimizers: List[MegatronOptimizer])", "inner_optimizers"),
    ("megatron/core/distributed/finalize_model_grads.py", 'getattr(param, "sequence_parallel", False)',
     "layers.wrap_megatron_targets (sequence-parallel adapter gradients summed over the group)"),
    ("megatron/core/tensor_parallel/mappings.py", "def gather_from_sequence_parallel_region(", "layers.MegatronSplit"),
    ("megatron/core/tensor_parallel/mappings.py", "def reduce_scatter_to_sequence_parallel_region(",
     "layers.MegatronSplit"),
    ("megatron/core/optimizer_param_scheduler.py",
     "param_group['weight_decay'] = self.get_wd(param_group) * param_group.get('wd_mult', 1.0)",
     "weight_decay_of (a group's decay is weight_decay x wd_mult)"),
]


@pytest.mark.parametrize("relative, text, user", RELIED_ON, ids=[f"{r}:{u.split()[0]}" for r, _, u in RELIED_ON])
def test_the_megatron_internals_beamlora_uses_are_still_there(relative, text, user):
    assert text in source(relative), (f"megatron-core {importlib.metadata.version('megatron-core')} changed "
                                      f"{relative}: {text!r} is gone; fix backends/megatron/internals.py {user}")


def test_the_installed_megatron_core_is_the_pinned_one():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
    assert importlib.metadata.version("megatron-core") == pins["megatron-core"]
