"""BeamLoRA on the tiny built-in Llama under DeepSpeed AutoTP, against the unsplit single-process run.

    deepspeed --num_gpus 2 tests/distributed/tp_worker.py --runs runs.json --out results.pt

`train_reference(**options)` (called in the test's own process) trains the unsplit model with plain torch AdamW and
clipping (CLIP) on the whole global batch. Under `deepspeed`, each run of runs.json ({label: options}) trains a fresh
engine in the same processes, one after another (a launch costs more than a run): the BeamLoRA layers split by
beamlora_ds.prepare_tensor_parallel, AutoTP splitting the rest, ZeRO over the data-parallel replicas (world / tp),
each replica training on its share of the global batch (the processes of a tensor-parallel group on the same
share). Rank 0 writes {label: result}: mean losses, reset history, the consolidated fp32 adapter (what save_adapter
writes), and every process's own copy of each tensor (replicated ones must be equal across a group).
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import beamlora_ds  # noqa: E402
from beamlora_ds import BeamLoRAConfig, optimizer_param_groups  # noqa: E402
from beamlora_ds.loading import builtin  # noqa: E402

GLOBAL_BATCH, LENGTH, LR = 4, 16, 1e-2
CLIP = 0.05  # below every step's gradient norm: clipping always acts, so a wrong global norm changes the run
RUN_DEFAULTS = {"stage": 1, "tp": 2, "dtype": "fp32", "steps": 12, "interval": 4, "importance": "score",
                "stop_at": 0, "ckpt_dir": "", "no_mark": False,
                "save_at_end": ""}  # a checkpoint folder written after the last step (offline export reads it)


def build(run: dict):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(builtin.tiny_llama_config())
    cfg = BeamLoRAConfig(r=4, alpha=8.0, dropout=0.0, tau=0.05, interval=run["interval"], total_steps=run["steps"],
                         p0=0.6, seed=0, importance=run["importance"])
    beam = beamlora_ds.apply(model, cfg)
    return model, beam


def batches(steps: int, vocab: int):
    """The global batches: the same on every process (each replica then takes its rows)."""
    g = torch.Generator().manual_seed(3)
    return [torch.randint(4, vocab, (GLOBAL_BATCH, LENGTH), generator=g) for _ in range(steps)]


def summary(beam, losses, adapter) -> dict:
    history = [{"step": r["step"], "pruned": sorted(map(list, r["pruned"])), "sources": sorted(map(list, r["sources"]))}
               for r in beam.history]
    return {"losses": losses, "history": history, "adapter": adapter, "global_step": beam.global_step}


def train_reference(**options) -> dict:
    """The unsplit single-process run: plain torch AdamW, gradients clipped to CLIP as DeepSpeed does."""
    run = {**RUN_DEFAULTS, **options}
    model, beam = build(run)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=LR)
    losses = []
    norms = []
    for ids in batches(run["steps"], model.config.vocab_size):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, CLIP).item())
        optimizer.step()
        beam.step(optimizer)
        losses.append(loss.item())
    adapter = {f"{name}.{key}": getattr(m, key).detach().float().clone()
               for name, m in zip(beam.module_names, beam.modules) for key in ("lora_A", "lora_B", "lora_score")}
    result = summary(beam, losses, adapter)
    result["grad_norms"] = norms
    return result


def ds_config(run: dict, replicas: int) -> dict:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // replicas, "gradient_accumulation_steps": 1,
            "train_batch_size": GLOBAL_BATCH, "zero_allow_untested_optimizer": True, "gradient_clipping": CLIP,
            "bf16": {"enabled": run["dtype"] == "bf16"}, "tensor_parallel": {"autotp_size": run["tp"]},
            "zero_optimization": {"stage": run["stage"], "stage3_param_persistence_threshold": 10**6},
            "steps_per_print": 10**6, "wall_clock_breakdown": False}


def engine_for(run: dict, world: int):
    import deepspeed
    from deepspeed.utils import groups

    model, beam = build(run)
    config = ds_config(run, world // run["tp"])
    splits = beamlora_ds.prepare_tensor_parallel(model, config)
    if run["no_mark"]:  # the check that the tests fail without DeepSpeed's tensor-parallel mark on the split factor
        for name, split in splits.items():
            delattr(getattr(dict(zip(beam.module_names, beam.modules))[name], split.split_factor), "tensor_model_parallel")
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.0), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=groups)
    return model, beam, engine


def local_tensors(beam, stage: int) -> dict:
    """This process's fp32 values of every adapter tensor (its slice of a split one). Collective under ZeRO."""
    from beamlora_ds.backends.deepspeed.zero_params import full_fp32_param

    out = {}
    for name, m in zip(beam.module_names, beam.modules):
        for key in ("lora_A", "lora_B"):
            out[f"{name}.{key}"] = full_fp32_param(getattr(m, key)).float().cpu().clone()
    out["scores"] = full_fp32_param(beam.modules[0].score_parameter).float().cpu().clone()
    return out


def train_tp(run: dict, dist) -> dict:
    from beamlora_ds.export.live import adapter_state_from_model

    rank, world = dist.get_rank(), dist.get_world_size()
    model, beam, engine = engine_for(run, world)
    replicas, replica = world // run["tp"], rank // run["tp"]
    rows = GLOBAL_BATCH // replicas
    dtype_losses, grad_norms, all_batches = [], [], batches(run["steps"], model.config.vocab_size)
    step = 0
    while step < run["steps"]:
        ids = all_batches[step][replica * rows:(replica + 1) * rows]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norms.append(float(norm) if norm is not None else float("nan"))
        step += 1
        beam.step(engine)
        dtype_losses.append(loss.item())
        if run["stop_at"] and step == run["stop_at"]:  # checkpoint, then continue on a fresh engine from it
            beamlora_ds.save_checkpoint(engine, beam, run["ckpt_dir"])
            model, beam, engine = engine_for(run, world)
            beamlora_ds.load_checkpoint(engine, beam, run["ckpt_dir"])
            assert beam.global_step == step
    if run["save_at_end"]:
        beamlora_ds.save_checkpoint(engine, beam, run["save_at_end"])
    losses = torch.tensor(dtype_losses, dtype=torch.float64)
    dist.all_reduce(losses)  # every process of a group holds the same loss: the mean over processes is the replicas'
    state = adapter_state_from_model(model)
    adapter = {f"{name}.{key}": getattr(state, key)[name] for name in state.module_names
               for key in ("lora_A", "lora_B", "lora_score")}
    mine = local_tensors(beam, run["stage"])
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    result = summary(beam, (losses / world).tolist(), adapter)
    result["local"] = everyone
    result["grad_norms"] = grad_norms  # the global norm DeepSpeed clipped with
    result["splits"] = {name: (m.tensor_parallel.kind, m.tensor_parallel.sizes) for name, m in
                        zip(beam.module_names, beam.modules) if m.tensor_parallel is not None}
    del engine
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="JSON file: {label: {option: value}}")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    import deepspeed
    import deepspeed.comm as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    with open(args.runs) as f:
        runs = json.load(f)
    results = {label: train_tp({**RUN_DEFAULTS, **options}, dist) for label, options in runs.items()}
    if dist.get_rank() == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
