"""Building a megatron-core optimizer for BeamLoRA: Megatron's own parameter groups, with no weight decay on the
score table (a 2-D parameter, which Megatron's default rule would decay; the paper never decays the score)."""
from __future__ import annotations

SCORE_PARAMETER = "*lora_score"  # the score table, model.beamlora_scores.lora_score, by Megatron's name matching


def megatron_optimizer_overrides(optimizer_config) -> dict:
    """`config_overrides` for `get_megatron_optimizer`: Megatron's standard ones (no decay on biases and 1-D
    parameters) plus no decay on the BeamLoRA score table."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = dict(get_standard_config_overrides(optimizer_config))
    # wd_mult 0 for Megatron's scheduler, which sets a group's weight_decay to wd x wd_mult at every step, and
    # weight_decay 0 for a loop without that scheduler (the torch optimizer reads the group's weight_decay)
    overrides[ParamKey(name=SCORE_PARAMETER)] = ParamGroupOverride(wd_mult=0.0, weight_decay=0.0)
    return overrides
