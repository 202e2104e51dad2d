"""apply()'s order checks in a plain torch process (beamlora_ds/adapt.py). The DeepSpeed forms (apply after
deepspeed.initialize, apply on an engine) run on real engines in tests/distributed/test_misuse.py."""
import warnings

import torch

from beamlora_ds import BeamLoRAConfig, apply, optimizer_param_groups
from helpers import TwoLayerNet

CONFIG = dict(r=4, alpha=8.0, total_steps=40, interval=8)


def apply_and_collect(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        beam = apply(model, BeamLoRAConfig(**CONFIG))
    return beam, [str(w.message) for w in caught if "apply()" in str(w.message)]


def test_an_optimizer_built_before_apply_is_warned_about_with_the_order():
    model = TwoLayerNet()
    early = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, said = apply_and_collect(model)
    assert len(said) == 1 and "built before apply()" in said[0] and "optimizer_param_groups" in said[0], said
    assert early is not None


def test_the_right_order_and_other_models_optimizers_are_not_warned_about():
    other = TwoLayerNet()
    unrelated = torch.optim.SGD(other.parameters(), lr=0.1)  # another model's optimizer: none of our business
    model = TwoLayerNet()
    _, said = apply_and_collect(model)
    assert said == []
    torch.optim.AdamW(optimizer_param_groups(model), lr=1e-3)  # built after apply(): the right order
    assert unrelated is not None
