"""The DeepSpeed engine of a BeamLoRA run: built around a model BeamLoRA was applied to, stepped one optimizer
step (all its micro-batches) at a time. What launch/train.py does between `apply` and its loop, for any script
that trains the same way."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from ..method.inject import optimizer_param_groups
from ..backends.deepspeed.config import autotp_size
from ..backends.deepspeed.zero_params import persistence_threshold_for
from ..testing.failpoints import kill_point
from .ds_config_auto import fill_for_model
from .lr_schedule import lr_lambda


def initialize_engine(model, modules, ds_config: dict, *, learning_rate: float, weight_decay: float,
                      lr_scheduler_type: str, total_steps: int, warmup_steps: int):
    """deepspeed.initialize once the config's last "auto" values are filled from the model (bucket sizes from its
    hidden size, the ZeRO-3 persistence threshold that keeps the adapters `modules` resident; `ds_config` is what
    ds_config_auto.fill_before_loading returned); AdamW over
    `optimizer_param_groups` and the `lr_scheduler_type` warmup schedule when the config names neither.
    Returns (engine, the resolved config)."""
    import deepspeed

    config = fill_for_model(ds_config, learning_rate=learning_rate, total_steps=total_steps,
                            warmup_steps=warmup_steps, hidden_size=getattr(model.config, "hidden_size", None),
                            persistence_threshold=persistence_threshold_for(modules))
    groups = optimizer_param_groups(model, weight_decay)
    optimizer = scheduler = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=learning_rate)
        config["zero_allow_untested_optimizer"] = True
    if "scheduler" not in config:
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(lr_scheduler_type, warmup_steps, total_steps)))
    mpu = None
    if autotp_size(config) > 1:  # DeepSpeed's groups: the batch arithmetic counts data-parallel replicas
        from deepspeed.utils import groups as mpu
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                           lr_scheduler=scheduler, config=config, mpu=mpu)
    return engine, config


def optimizer_step(engine, micro_batches: Iterable[dict], step: int, world_size: int = 1,
                   dist=None, replicas: Optional[int] = None) -> Tuple[float, float, int]:
    """Forward, backward and `engine.step()` for each micro-batch of one optimizer step (gradient accumulation).

    Returns (the loss of the whole global batch: the mean over micro-batches and over processes, the same number
    on every process; the learning rate; the tokens all processes trained on). `dist` (deepspeed.comm) is needed
    when `world_size` > 1. `step` names the step for the kill-and-resume tests' crash point. `replicas`: the
    data-parallel replicas (world_size / tensor-parallel degree; default world_size), which see different data."""
    tokens, losses = 0, []
    for batch in micro_batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        kill_point("step", step)
        engine.step()
        tokens += int(batch["attention_mask"].sum()) * (replicas or world_size)
        losses.append(loss.item())
    loss_value, lr = sum(losses) / len(losses), engine.get_lr()[0]
    if world_size > 1:  # the loss of the whole global batch (mean over processes), not this process's share
        loss_value = float(all_reduce_to_cpu(dist, torch.tensor([loss_value]), engine.device)[0]) / world_size
    return loss_value, lr, tokens


def all_reduce_to_cpu(dist, tensor: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    """SUM of `tensor` over every process (moved to the collective's device and back)."""
    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()
