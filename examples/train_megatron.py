"""BeamLoRA in your own megatron-core training loop: the lines that are BeamLoRA's are marked # BeamLoRA.

A small Llama trained on addition in plain torch (a stand-in for the Hugging Face model you fine-tune) is converted
to a Megatron GPT, gets BeamLoRA on its fused qkv, attention output, fused gate/up and down projections, and learns
subtraction under tensor (and sequence) parallelism with Megatron's DistributedOptimizer; the end writes a stock
peft adapter for the HF model. On GPUs:

    torchrun --nproc_per_node 2 examples/train_megatron.py --tensor_parallel 2 --sequence_parallel
"""
import argparse
import os
import random

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from transformers import LlamaConfig, LlamaForCausalLM

import beamlora_ds

VOCAB = list("0123456789+-=;") + ["<pad>"] * 2  # 16 entries: any tensor-parallel size up to 16 splits it
SEQ = 16


def batch(rng: random.Random, size: int, device, op: str = "-"):
    """'a-b=c;' strings (or 'a+b=c;'); the loss mask keeps the answer (Megatron's loss takes no ignore index)."""
    tokens, mask = [], []
    for _ in range(size):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt, text = f"{a}{op}{b}=", f"{a}{op}{b}={a + b if op == '+' else a - b};"
        ids = [VOCAB.index(c) for c in text] + [len(VOCAB) - 1] * (SEQ + 1 - len(text))
        tokens.append(ids)
        mask.append([0.0] * (len(prompt) - 1) + [1.0] * (len(text) - len(prompt)) + [0.0] * (SEQ + 1 - len(text)))
    tokens = torch.tensor(tokens, device=device)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.tensor(mask, device=device)[:, :SEQ]}


def pretrained_base(steps: int = 200) -> LlamaForCausalLM:
    """The stand-in for a downloaded model: a small Llama trained in full on addition (the same on every process)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    optimizer, rng = torch.optim.AdamW(model.parameters(), lr=3e-3), random.Random(0)
    for _ in range(steps):
        data = batch(rng, 32, "cpu", op="+")
        logits = model(data["tokens"]).logits
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), data["labels"], reduction="none")
        ((per_token * data["loss_mask"]).sum() / data["loss_mask"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def forward_step(data_iterator, model):
    data = next(data_iterator)
    positions = torch.arange(SEQ, device=data["tokens"].device).expand_as(data["tokens"])
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool, device=data["tokens"].device), 1)[None, None]
    per_token = model(input_ids=data["tokens"], position_ids=positions, attention_mask=causal, labels=data["labels"])

    def loss_func(output):
        loss = (output.float() * data["loss_mask"]).sum() / data["loss_mask"].sum()
        return loss, {"loss": loss.detach().clone()}  # a copy: the schedule divides `loss` in place

    return per_token, loss_func


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensor_parallel", type=int, default=1)
    parser.add_argument("--sequence_parallel", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output_dir", default="out/megatron_example")
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel)
    model_parallel_cuda_manual_seed(0)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    hf_model = pretrained_base()
    gpt = beamlora_ds.megatron_gpt_from_hf(hf_model, sequence_parallel=args.sequence_parallel).to(device)
    beam = beamlora_ds.apply(gpt, beamlora_ds.BeamLoRAConfig(  # BeamLoRA: before DDP and the optimizer
        r=8, alpha=16, dropout=0.0, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        interval=10, total_steps=args.steps))

    model = DistributedDataParallel(config=gpt.config, module=gpt, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True))
    gpt.config.no_sync_func, gpt.config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    optimizer_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=1.0,
                                       use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(optimizer_config, [model],  # BeamLoRA: no weight decay on the scores
                                       config_overrides=beamlora_ds.megatron_optimizer_overrides(optimizer_config))

    rng = random.Random(1000 + parallel_state.get_data_parallel_rank())  # each data-parallel rank its own data
    for step in range(args.steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch(rng, 16, device)]), model=[model],
            num_microbatches=1, seq_length=SEQ, micro_batch_size=16, forward_only=False)
        optimizer.step()
        record = beam.step(optimizer)  # BeamLoRA: after every optimizer step
        if torch.distributed.get_rank() == 0 and (record or (step + 1) % 10 == 0):
            print(f"step {step + 1}: loss {losses[0]['loss'].item():.4f}"
                  + (f", reset pruned {len(record['pruned'])} ranks" if record else ""), flush=True)

    # BeamLoRA: a stock peft adapter for the HF model (every process calls it; process 0 writes)
    beamlora_ds.save_megatron_adapter(model, os.path.join(args.output_dir, "adapter"), hf_model.config,
                                      optimizer=optimizer, overwrite=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
