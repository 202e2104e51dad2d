"""Train the tiny Llama with BeamLoRA under DeepSpeed for a few steps, then export it two ways.

For each requested ZeRO stage (one engine after another in the same processes): train, compute the logits
of a fixed input inside the engine, read the full fp32 adapter tensors straight from DeepSpeed, call
`save_adapter(engine, ...)` and `beamlora_ds.save_checkpoint(...)`, and check that a second save_adapter into
the now non-empty folder is refused on every process (no hang). Rank 0 writes everything to --out_dir/result.pt.
"""
import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_llama  # noqa: E402

import beamlora_ds  # noqa: E402
from beamlora_ds import BeamLoRAConfig, optimizer_param_groups  # noqa: E402
from beamlora_ds.export.live import save_adapter  # noqa: E402

STEPS, MICRO_BATCH, SEQ = 8, 2, 8


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", required=True)
    p.add_argument("--stages", default="3", help="comma-separated ZeRO stages, run one after another")
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args()


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "wall_clock_breakdown": False}


def full_fp32(param, stage):
    """DeepSpeed's own view of the trained tensor (the fp32 master), independent of zero_params.full_fp32_param."""
    from deepspeed.utils import safe_get_full_fp32_param

    return (safe_get_full_fp32_param(param) if stage > 0 else param.detach()).float().cpu().clone()


def train_and_export(stage, out_dir, rank):
    import deepspeed
    import deepspeed.comm as dist

    model = tiny_llama(seed=0)
    model.config.name_or_path = "tiny-seed0"
    cfg = BeamLoRAConfig(r=4, alpha=8.0, dropout=0.0, tau=0.05, total_steps=STEPS, interval=4, p0=0.8, seed=0)
    beam = beamlora_ds.apply(model, cfg)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    engine.train()
    for step in range(STEPS):
        ids = torch.randint(0, 64, (MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(100 * step + rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        beam.step(engine)
    engine.eval()
    fixed = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = engine(input_ids=fixed).logits.float().cpu()
    weights = {f"{name}.{key}": full_fp32(getattr(m, key), stage)
               for name, m in zip(beam.module_names, beam.modules) for key in ("lora_A", "lora_B")}
    table = full_fp32(beam.modules[0].score_parameter, stage)  # the scores: one (modules x r) table, row = module
    weights.update({f"{name}.lora_score": table[m.score_row] for name, m in zip(beam.module_names, beam.modules)})

    adapter_dir = os.path.join(out_dir, f"adapter{stage}")
    save_adapter(engine, adapter_dir, base_model_name_or_path=os.path.join(out_dir, "base"))
    beamlora_ds.save_checkpoint(engine, beam, os.path.join(out_dir, f"ckpt{stage}"))
    beamlora_ds.save_checkpoint(engine, beam, os.path.join(out_dir, f"full{stage}"), include_base=True)
    try:
        save_adapter(engine, adapter_dir)
        refused = torch.tensor([0])
    except FileExistsError:
        refused = torch.tensor([1])
    dist.all_reduce(refused)
    from beamlora_ds.checkpointing.base_identity import base_identity

    return {"logits": logits, "weights": weights, "refused_on": int(refused.item()),
            "fingerprint": base_identity(engine.module)["fingerprint"],
            "resets": [(r["step"], len(r["pruned"])) for r in beam.history],
            "resumed": resume_on_a_fresh_base(stage, out_dir, cfg, seed=0),
            "other_base": resume_on_a_fresh_base(stage, out_dir, cfg, seed=1)}


def resume_on_a_fresh_base(stage, out_dir, cfg, seed):
    """load_checkpoint(ckpt{stage}) into a freshly built base with `seed` (0: the trained one): the full fp32
    adapter tensors it resumes to, or the error it refuses with."""
    import deepspeed

    model = tiny_llama(seed=seed)
    model.config.name_or_path = f"tiny-seed{seed}"
    beam = beamlora_ds.apply(model, cfg)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    try:
        beamlora_ds.load_checkpoint(engine, beam, os.path.join(out_dir, f"ckpt{stage}"))
    except ValueError as e:
        return str(e)
    return {f"{name}.{key}": full_fp32(getattr(m, key), stage)
            for name, m in zip(beam.module_names, beam.modules) for key in ("lora_A", "lora_B")}


def main():
    args = parse()
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    if rank == 0:
        tiny_llama(seed=0).save_pretrained(os.path.join(args.out_dir, "base"))
    results = {"world": dist.get_world_size()}
    for stage in (int(s) for s in args.stages.split(",")):
        results[stage] = train_and_export(stage, args.out_dir, rank)
    if rank == 0:
        torch.save(results, os.path.join(args.out_dir, "result.pt"))


if __name__ == "__main__":
    main()
