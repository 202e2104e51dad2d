"""The usual mistakes around deepspeed.initialize, each on a real one-process DeepSpeed engine (CPU, gloo); what
BeamLoRA said about each goes to OUT as JSON: {case: {"raised": type, "message": str, "warnings": [str]}}.

    python tests/distributed/misuse_worker.py OUT     (with RANK/WORLD_SIZE/MASTER_* set: testing.single_process_env)
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
from beamlora_ds import models  # noqa: E402

CONFIG = dict(r=4, alpha=8.0, total_steps=8, interval=4, dropout=0.0)


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10**6},
            "zero_allow_untested_optimizer": True}


def fresh():
    torch.manual_seed(0)
    return models.load_model(models.BUILTIN_TINY, torch.float32, {})


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


def build(stage=2):
    model = fresh()
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(**CONFIG))
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    return model, beam, optimizer, engine


def apply_to_engine(out):
    beamlora_ds.apply(build()[3], beamlora_ds.BeamLoRAConfig(**CONFIG))


def step_with_engine_optimizer(out):
    _, beam, _, engine = build()
    engine_step(engine)
    beam.step(engine.optimizer)


def step_with_client_optimizer(out):
    _, beam, optimizer, engine = build()
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
         "extra_steps": extra_steps}


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
            try:
                case(out)
                raised, message = None, ""
            except Exception as e:  # noqa: BLE001 - what was raised is the result
                raised, message = type(e).__name__, str(e)
        logging.getLogger("beamlora_ds").removeHandler(collect)
        results[name] = {"raised": raised, "message": message,
                         "warnings": [str(w.message) for w in caught if "beamlora" in w.filename or
                                      "apply()" in str(w.message)] + collect.messages}
    with open(os.path.join(out, "misuse.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
