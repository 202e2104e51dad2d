"""ZeroAccess's in-process parts (beamlora_ds/backends/deepspeed/zero_access.py): the ZeRO-3 persistence threshold
and its warning, and the refusal of a stage it cannot edit. Real multi-process resets against the single-process
run are in tests/distributed/test_zero_access_parity.py."""
import logging

import pytest

from beamlora_ds import BeamLoRAConfig, apply, persistence_threshold_for
from beamlora_ds.backends.deepspeed.zero_params import warn_if_adapters_not_persistent
from helpers import TwoLayerNet


def two_layer_modules(r=8):
    return apply(TwoLayerNet(), BeamLoRAConfig(r=r, alpha=2.0 * r, total_steps=40, interval=8)).modules


def test_persistence_threshold_is_one_above_the_largest_adapter_tensor():
    # q_proj 12 -> 16: A 8 x 12 = 96, B 16 x 8 = 128; down_proj 16 -> 8: A 8 x 16 = 128, B 8 x 8 = 64
    assert persistence_threshold_for(two_layer_modules(r=8)) == 129
    assert persistence_threshold_for(two_layer_modules(r=2)) == 33  # 16 x 2 = 32


def test_partitioned_adapters_are_warned_about_with_the_threshold_that_fixes_it(caplog):
    modules = two_layer_modules()
    params = [p for m in modules for p in (m.lora_A, m.lora_B)] + [modules[0].score_parameter]  # one score table
    for p in params:  # what ZeRO-3 sets on its parameters
        p.ds_persist, p.ds_numel = True, p.numel()
    with caplog.at_level(logging.WARNING, logger="beamlora_ds.backends.deepspeed.zero_params"):
        warn_if_adapters_not_persistent(modules)
    assert caplog.records == []
    params[0].ds_persist = params[3].ds_persist = False
    with caplog.at_level(logging.WARNING, logger="beamlora_ds.backends.deepspeed.zero_params"):
        warn_if_adapters_not_persistent(modules)
    assert "2 of 5 BeamLoRA tensors are partitioned" in caplog.text
    assert "stage3_param_persistence_threshold >= 129" in caplog.text


def test_stage_0_is_refused():
    from beamlora_ds.backends.deepspeed.zero_access import ZeroAccess

    class Stage0Engine:
        def zero_optimization_stage(self):
            return 0

    with pytest.raises(ValueError, match="ZeRO stages 1-3, not 0"):
        ZeroAccess(two_layer_modules(), Stage0Engine())
