"""The usual mistakes around deepspeed.initialize, each on a real DeepSpeed engine (CPU, gloo, 2 processes); what
BeamLoRA said about each goes to OUT/misuse_rank{R}.json: {case: {"raised": type, "message": str, "warnings": [str],
"value": ...}}.

    deepspeed --num_gpus 2 tests/distributed/misuse_worker.py OUT
"""
import datetime
import json
import logging
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import deepspeed  # noqa: E402

import beamlora_ds  # noqa: E402
from beamlora_ds.loading import builtin, models  # noqa: E402

CONFIG = dict(r=4, alpha=8.0, total_steps=8, interval=4, dropout=0.0)


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10**6},
            "zero_allow_untested_optimizer": True}


def fresh():
    torch.manual_seed(0)
    return models.load_model(builtin.BUILTIN_TINY, torch.float32, {})


def engine_step(engine):
    ids = torch.randint(3, 60, (2, 12))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def optimizer_before_apply(out):
    model = fresh()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(**CONFIG))
    deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(2))


def apply_after_initialize(stage):
    def case(out):
        model = fresh()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
        beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(**CONFIG))
    return case


def build(stage=2, groups=None, config_optimizer=None):
    model = fresh()
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(**CONFIG))
    config = ds_config(stage)
    if config_optimizer:  # DeepSpeed builds the optimizer from its config
        config["optimizer"] = config_optimizer
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad], config=config)
        return model, beam, None, engine
    params = (groups or beamlora_ds.optimizer_param_groups)(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return model, beam, optimizer, engine


def decayed_scores(stage, decay_scores):
    """How many scores the engine's real optimizer decays: every one (one group, weight_decay 0.1), or none."""
    def case(out):
        groups = (lambda m: [p for p in m.parameters() if p.requires_grad]) if decay_scores else \
            (lambda m: beamlora_ds.optimizer_param_groups(m, weight_decay=0.1))
        _, beam, _, engine = build(stage, groups)
        return len(beam.decayed_scores(engine))
    return case


def zero0_with_config_optimizer(out):
    """ZeRO-0 fp32 with the DeepSpeed config's optimizer section: the engine steps DeepSpeed's own torch optimizer."""
    _, beam, _, engine = build(0, config_optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}})
    for _ in range(2):
        engine_step(engine)
        beam.step(engine)
    return type(engine.optimizer).__name__


SHARED = {}


def refusing_engine():
    """One ZeRO-2 engine for the cases refused before they change anything (each engine costs seconds)."""
    if "built" not in SHARED:
        SHARED["built"] = build()
    return SHARED["built"]


def apply_to_engine(out):
    beamlora_ds.apply(refusing_engine()[3], beamlora_ds.BeamLoRAConfig(**CONFIG))


def step_with_engine_optimizer(out):
    _, beam, _, engine = refusing_engine()
    engine_step(engine)
    beam.step(engine.optimizer)


def step_with_client_optimizer(out):
    _, beam, optimizer, engine = refusing_engine()
    engine_step(engine)
    beam.step(optimizer)


def forgotten_steps(out):
    """Three engine steps, no beam.step: save_checkpoint and save_adapter say so with the numbers."""
    _, beam, _, engine = build()
    for _ in range(3):
        engine_step(engine)
    beamlora_ds.save_checkpoint(engine, beam, os.path.join(out, "forgotten_ckpt"))
    beamlora_ds.save_adapter(engine, os.path.join(out, "forgotten_adapter"))


def extra_steps(out):
    _, beam, _, engine = build(stage=3)
    for _ in range(2):
        engine_step(engine)
        beam.step(engine)
        beam.step(engine)
    beamlora_ds.save_checkpoint(engine, beam, os.path.join(out, "extra_ckpt"))


CASES = {"optimizer_before_apply": optimizer_before_apply, "apply_after_initialize_zero2": apply_after_initialize(2),
         "apply_after_initialize_zero3": apply_after_initialize(3), "apply_to_engine": apply_to_engine,
         "step_with_engine_optimizer": step_with_engine_optimizer,
         "step_with_client_optimizer": step_with_client_optimizer, "forgotten_steps": forgotten_steps,
         "extra_steps": extra_steps, "decayed_scores_zero2": decayed_scores(2, True),
         "decayed_scores_zero3": decayed_scores(3, True), "undecayed_scores_zero2": decayed_scores(2, False),
         "undecayed_scores_zero3": decayed_scores(3, False), "zero0_with_config_optimizer": zero0_with_config_optimizer}


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(out):
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, case in CASES.items():
        collect = Collect()
        logging.getLogger("beamlora_ds").addHandler(collect)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = None
            try:
                value = case(out)
                raised, message = None, ""
            except Exception as e:  # noqa: BLE001 - what was raised is the result
                raised, message = type(e).__name__, str(e)
        logging.getLogger("beamlora_ds").removeHandler(collect)
        results[name] = {"raised": raised, "message": message, "value": value,
                         "warnings": [str(w.message) for w in caught if "beamlora" in w.filename or
                                      "apply()" in str(w.message)] + collect.messages}
    with open(os.path.join(out, f"misuse_rank{deepspeed.comm.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[-1])  # the launcher puts --local_rank=N first
