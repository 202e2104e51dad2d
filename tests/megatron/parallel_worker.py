"""BeamLoRA on a tiny megatron-core GPT in one or more parallel layouts, one after the other in the same processes;
process 0 writes what each run did (losses, pruned sets, the consolidated adapter) as JSON for the test to compare
with the single-process run. A layout is `tp<T>[sp][-plain]`: tensor parallelism T (the rest of the world is data
parallel), sequence parallelism, Megatron's plain optimizer instead of the DistributedOptimizer.

    python spawn.py --nproc N parallel_worker.py --runs tp2/score,tp2sp/norm --out result.json [--resume tp2sp]
"""
import argparse
import json
import os
import sys
import re
import tempfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_shims  # noqa: F401,I001  (first: the CPU shims, test processes only)
import torch
import torch.distributed as dist

import gpt_setup
import beamlora_ds
from beamlora_ds.backends.tensor_parallel import gather_split

STEPS, MICRO_BATCHES, MICRO_BATCH_SIZE, RESUME_AT = 6, 2, 4, 3


LAYOUT = re.compile(r"tp(\d+)(?:pp(\d+))?(?:vp(\d+))?(?:L(\d+))?(sp)?(?:-(plain))?$")


def parse_layout(layout: str) -> dict:
    """`tp<T>[pp<P>][vp<V>][L<layers>][sp][-plain]`: tensor, pipeline and virtual pipeline sizes, the GPT's layers,
    sequence parallelism, the plain optimizer instead of the DistributedOptimizer."""
    tp, pp, vp, layers, sp, plain = LAYOUT.match(layout).groups()
    return {"tp": int(tp), "pp": int(pp or 1), "vp": int(vp) if vp else None,
            "layers": int(layers or gpt_setup.LAYERS), "sequence_parallel": bool(sp), "distributed": not plain}


def build(layout: str, importance: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    place = parse_layout(layout)
    gpt = gpt_setup.build_gpt(place["tp"], place["sequence_parallel"], pp=place["pp"], vp=place["vp"],
                              layers=place["layers"])
    chunks = gpt if isinstance(gpt, list) else [gpt]
    config = beamlora_ds.BeamLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=gpt_setup.TARGETS, interval=2,
                                        p0=0.75, total_steps=STEPS, importance=importance, seed=3)
    beam = beamlora_ds.apply(gpt, config)
    warm_start(beam, place["tp"])
    model = [DistributedDataParallel(config=chunk.config, module=chunk, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=place["distributed"], grad_reduce_in_fp32=True)) for chunk in chunks]
    shared = chunks[0].config  # one TransformerConfig object for every chunk
    shared.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    shared.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=2e-2, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=place["distributed"]),
        model)
    return model, optimizer, beam


@torch.no_grad()
def warm_start(beam, tp: int) -> None:
    """B and the scores as a run some steps in would have them (the same in every layout, each module's drawn by
    its name): with B = 0 and scores 0 the first resets would rank near-ties (Adam moves every score by the same
    first step), which rounding decides."""
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    for name, m in zip(beam.module_names, beam.modules):
        generator = torch.Generator().manual_seed(len(name) * 7919 + zlib.crc32(name.encode()))
        full = torch.randn(m.out_features, m.r, generator=generator) * 0.05
        split = m.tensor_parallel
        if split is not None and split.split_factor == "lora_B":
            full = gpt_setup.tensor_parallel_slice(name, full, tp, rank, 0)
        m.lora_B.copy_(full)
        m.score_parameter[m.score_row].copy_(torch.randn(m.r, generator=generator) * 0.02)


def train_step(model, optimizer, beam, micro_batches):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = [{k: v[dp_rank::dp] for k, v in batch.items()} for batch in micro_batches]
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=gpt_setup.forward_step, data_iterator=[iter(mine) for _ in model] if len(model) > 1
        else iter(mine), model=model, num_microbatches=len(mine), seq_length=gpt_setup.SEQ,
        micro_batch_size=len(mine[0]["tokens"]), forward_only=False)
    optimizer.step()
    beam.step(optimizer)
    loss = torch.stack([d["loss"] for d in losses]).mean() if losses else torch.zeros(())
    if ps.get_pipeline_model_parallel_world_size() > 1:  # the loss is the last stage's
        dist.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return loss.item() / dp


def consolidated(beam):
    """The whole adapter: split factors gathered over the tensor-parallel group."""
    out = {}
    for name, m in zip(beam.module_names, beam.modules):
        a, b = m.lora_A.detach().float(), m.lora_B.detach().float()
        split = m.tensor_parallel
        if split is not None:
            whole = gather_split(getattr(m, split.split_factor).detach().float(), split)
            whole = gpt_setup.whole_from_slices(name, whole.split(list(split.sizes), split.split_dim), split.split_dim)
            a, b = (a, whole) if split.split_factor == "lora_B" else (whole, b)
        out[name] = {"A": a.tolist(), "B": b.tolist(), "score": m.lora_score.detach().float().tolist()}
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:  # every stage's modules
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, out, group=ps.get_pipeline_model_parallel_group())
        out = {name: values for stage in stages for name, values in stage.items()}
    return out


def run(layout: str, importance: str, data, resume_at=None, folder=None):
    model, optimizer, beam = build(layout, importance)
    losses = []
    for step, micro_batches in enumerate(data):
        if resume_at is not None and step == resume_at:
            beamlora_ds.save_megatron_checkpoint(folder, model, optimizer, beam)
            model, optimizer, beam = build(layout, importance)  # a new run, from the checkpoint
            beamlora_ds.load_megatron_checkpoint(folder, model, optimizer, beam)
        losses.append(train_step(model, optimizer, beam, micro_batches))
    pruned = [[record["step"], sorted(map(list, record["pruned"]))] for record in beam.history]
    return {"losses": losses, "pruned": pruned, "adapter": consolidated(beam), "order": beam.whole_model.names,
            "all_reduce_bytes": beam.access_for(optimizer).all_reduce_bytes,
            "cut_parameters": cut_parameters(beam, optimizer)}


def cut_parameters(beam, optimizer) -> int:
    """How many adapter parameters a data-parallel shard boundary cuts (held in part by some process)."""
    from beamlora_ds.backends.megatron import internals

    cut = 0
    for inner in internals.inner_optimizers(optimizer):
        for m in beam.modules:
            for p in (m.lora_A, m.lora_B):
                start, numel = internals.owned_range(inner, p)
                cut += int(0 < numel < p.numel())
    total = torch.tensor([cut])
    dist.all_reduce(total)
    return int(total.item())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, help="layout/importance, ... (one after another)")
    parser.add_argument("--resume", default="", help="layouts whose score run is repeated, stopped and resumed")
    parser.add_argument("--export", default=None, help="a layout to check the peft export in (export_check.py)")
    parser.add_argument("--hf_checks", default=None, help="off,on: Megatron vs HF logits (hf_llama_worker.py)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps

    data = gpt_setup.batches(STEPS, MICRO_BATCHES, MICRO_BATCH_SIZE)
    holder = [tempfile.mkdtemp(prefix="beamlora_megatron_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    results = {}
    for key in args.runs.split(","):
        layout, importance = key.split("/")
        place = parse_layout(layout)
        gpt_setup.initialize(place["tp"], place["pp"], place["vp"])
        results[key] = run(layout, importance, data)
        if layout in args.resume.split(",") and f"{layout}/resumed" not in results and importance == "score":
            results[f"{layout}/resumed"] = run(layout, importance, data, RESUME_AT, os.path.join(holder[0], layout))
        ps.destroy_model_parallel()
    if args.export:
        import export_check

        place = parse_layout(args.export)
        gpt_setup.initialize(place["tp"], place["pp"])
        results["export"] = export_check.train_and_export(os.path.join(holder[0], "adapter"), place["tp"],
                                                          place["sequence_parallel"])
        ps.destroy_model_parallel()
    if args.hf_checks:
        import hf_llama_worker

        results["hf"] = hf_llama_worker.check(dist.get_world_size(), args.hf_checks)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
