"""The Megatron export against stock peft: the built-in tiny Llama converted to a Megatron GPT, BeamLoRA trained on
it through resets (this process group's tensor/sequence parallel layout), `save_megatron_adapter`, then process 0
loads the adapter with stock peft on the HF model and compares logits with the BeamLoRA Megatron model's.

Test processes only (the caller imported cpu_shims first)."""
import os

import torch
import torch.distributed as dist

import beamlora_ds
from beamlora_ds.backends.megatron.hf_llama import build_gpt, load_hf_into_gpt
from hf_llama_worker import megatron_logits

SEQ = 16


def train_and_export(out_dir: str, tp: int, sp: bool, steps: int = 5) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from beamlora_ds.loading.builtin import tiny_llama

    hf = tiny_llama(torch.float32)
    gpt = build_gpt(hf.config, tensor_parallel=tp, sequence_parallel=sp, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(), batch_p2p_sync=False)
    load_hf_into_gpt(gpt, hf, hf.config, tp_size=tp, tp_rank=ps.get_tensor_model_parallel_rank())
    beam = beamlora_ds.apply(gpt, beamlora_ds.BeamLoRAConfig(
        r=4, alpha=8, dropout=0.0, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        interval=2, p0=0.7, total_steps=steps, seed=5))
    model = DistributedDataParallel(config=gpt.config, module=gpt, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True))
    gpt.config.no_sync_func, gpt.config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    optimizer_config = OptimizerConfig(optimizer="adam", lr=5e-2, clip_grad=0.0, weight_decay=0.01,
                                       use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(optimizer_config, [model],
                                       config_overrides=beamlora_ds.megatron_optimizer_overrides(optimizer_config))
    generator = torch.Generator().manual_seed(9)
    for _ in range(steps):
        tokens = torch.randint(0, hf.config.vocab_size, (2, SEQ + 1), generator=generator)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                    num_microbatches=1, seq_length=SEQ, micro_batch_size=2, forward_only=False)
        optimizer.step()
        beam.step(optimizer)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=generator)
    gpt.eval()
    expected = pipelined_logits(model, ids) if ps.get_pipeline_model_parallel_world_size() > 1 else megatron_logits(gpt, ids)
    beamlora_ds.save_megatron_adapter(model, out_dir, hf.config, optimizer=optimizer,
                                      base_model_name_or_path="builtin-tiny")
    checkpoint = beamlora_ds.save_megatron_checkpoint(out_dir + "-checkpoint", model, optimizer, beam)
    result = {"resets": len(beam.history), "pruned": sum(len(r["pruned"]) for r in beam.history),
              "decayed_scores": beam.decayed_scores(optimizer),
              "group_weight_decays": sorted({g["weight_decay"] for g in optimizer.param_groups})}
    if dist.get_rank() == 0:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(tiny_llama(torch.float32), out_dir).eval()
        with torch.no_grad():
            got = peft_model(ids).logits
            plain = hf(ids).logits
        from safetensors.torch import load_file

        offline = beamlora_ds.export_megatron_checkpoint(checkpoint, out_dir + "-offline", hf.config)
        live, read = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out_dir, offline))
        result["offline_equals_live"] = live.keys() == read.keys() and all(torch.equal(live[k], read[k]) for k in live)
        result.update(max_abs_diff=(got - expected).abs().max().item(),
                      adapter_effect=(plain - expected).abs().max().item(),
                      files=sorted(os.listdir(out_dir)), peft_modules=len(peft_model.peft_config["default"]
                                                                              .target_modules),
                      layers=sorted({int(n.split("layers.")[1].split(".")[0])
                                     for n, _ in peft_model.named_modules() if n.endswith("lora_A")}))
    return result


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(batch["tokens"])
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    output = model(input_ids=batch["tokens"], position_ids=positions, attention_mask=mask, labels=batch["labels"])
    return output, lambda per_token: (per_token.float().mean(), {"loss": per_token.float().mean().detach()})


def pipelined_logits(model, ids):
    """The logits of `ids` through every pipeline stage (Megatron's schedule, forward only), the tensor-parallel
    vocabulary slices gathered on the last stage, then sent to process 0 (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def logits_step(data_iterator, chunk):
        batch = next(data_iterator)
        positions = torch.arange(SEQ).unsqueeze(0).expand_as(batch)
        mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
        output = chunk(input_ids=batch, position_ids=positions, attention_mask=mask)
        return output, lambda logits: (logits.float().sum() * 0, {"logits": logits.detach()})

    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=logits_step, data_iterator=iter([ids]), model=[model],
                                          num_microbatches=1, seq_length=SEQ, micro_batch_size=ids.shape[0],
                                          forward_only=True)
    holder = [None]
    if ps.is_pipeline_last_stage():
        local = out[0]["logits"]
        group = ps.get_tensor_model_parallel_group()
        slices = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(slices, local.contiguous(), group=group)
        holder = [torch.cat(slices, dim=-1)]
    speaker = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, dist.get_rank() if speaker else None)
    dist.broadcast_object_list(holder, src=next(r for r in ranks if r is not None))
    return holder[0] if dist.get_rank() == 0 else None
