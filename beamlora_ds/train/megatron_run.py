"""What launch/train_megatron.py is made of: its checks (before any process connects or weight loads), the
Megatron GPT of this pipeline stage converted from a Hugging Face Llama-family model, BeamLoRA applied, Megatron's
DDP, optimizer and scheduler, the data of fixed-length sequences, and one training step through
`get_forward_backward_func` (docs/megatron.md). Not part of the API."""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Iterator, List

import torch

from ..backends.megatron.hf_llama import check_convertible, gpt_from_hf, query_groups
from ..backends.megatron.optimizer_setup import megatron_optimizer_overrides
from ..backends.tensor_parallel import comm_device
from ..loading.models import load_model, load_tokenizer, model_path
from ..method.config import BeamLoRAConfig
from . import data as data_lib
from .checks import UsageError

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]  # every projection (q,k,v / o / gate,up / down)


def check_megatron_installed() -> None:
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise UsageError("megatron-core is not installed: pip install '.[megatron]' (megatron-core 0.16.1).")


def check_layout(args, world: int, hf_config) -> int:
    """The data-parallel size, after refusing every layout Megatron or the converter cannot run (one line, with the
    flag to change)."""
    tp, pp = args.tensor_parallel, args.pipeline_parallel
    if tp < 1 or world % tp:
        raise UsageError(f"--tensor_parallel={tp} does not divide the {world} processes.")
    if pp < 1 or world % (tp * pp):
        raise UsageError(f"--pipeline_parallel={pp} with --tensor_parallel={tp} does not divide the {world} processes "
                         "(tensor x pipeline parallel must).")
    if args.sequence_parallel and tp == 1:
        raise UsageError("--sequence_parallel needs --tensor_parallel of 2 or more (it splits the sequence over the "
                         "tensor-parallel group).")
    try:
        check_convertible(hf_config)
    except ValueError as e:
        raise UsageError(f"{args.model_name_or_path}: {e}") from None
    sizes = {"num_attention_heads": hf_config.num_attention_heads, "num_key_value_heads": query_groups(hf_config),
             "vocab_size": hf_config.vocab_size, "intermediate_size": hf_config.intermediate_size}
    uneven = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if uneven:
        raise UsageError(f"--tensor_parallel={tp} does not divide {', '.join(uneven)} of "
                         f"{args.model_name_or_path}; choose a tensor-parallel size that does.")
    check_stages(args, hf_config)
    if args.sequence_parallel and args.seq_length % tp:
        raise UsageError(f"--seq_length={args.seq_length} must be a multiple of --tensor_parallel={tp} under "
                         "sequence parallelism.")
    if args.r > min(hf_config.hidden_size, hf_config.intermediate_size):
        raise UsageError(f"--lora_r={args.r} is larger than the model's hidden size {hf_config.hidden_size}.")
    return world // (tp * pp)


def check_stages(args, hf_config) -> None:
    """Every pipeline stage gets num_layers / pipeline_parallel layers, at least one, and so BeamLoRA targets (the
    entry targets every projection of every layer)."""
    pp, layers = args.pipeline_parallel, hf_config.num_hidden_layers
    if pp > layers:
        raise UsageError(f"--pipeline_parallel={pp} is more than the {layers} layers of {args.model_name_or_path}: a "
                         "stage would hold no layer and no BeamLoRA target.")
    if layers % pp:
        raise UsageError(f"--pipeline_parallel={pp} does not divide the {layers} layers of "
                         f"{args.model_name_or_path}; every stage holds the same number of layers.")


def check_runs_here() -> None:
    """megatron-core builds its buffers on torch.cuda.current_device(): without a GPU it cannot run (the tests run
    it on CPUs with shims of their own, which library code never installs)."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as e:
        raise UsageError(f"megatron-core needs a CUDA GPU and this machine has none ({e}).") from None


def beam_config(args) -> BeamLoRAConfig:
    return BeamLoRAConfig(r=args.r, alpha=args.alpha if args.alpha else 2.0 * args.r, dropout=0.0, tau=args.tau,
                          target_modules=TARGETS, interval=args.interval, p0=args.p0, total_steps=args.steps,
                          seed=args.seed)


def converted_gpt(args):
    """The GPT of this tensor-parallel rank and pipeline stage with the HF model's weights (every process reads the
    HF checkpoint)."""
    from megatron.core import parallel_state as ps

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hf_model = load_model(model_path(args.model_name_or_path), torch.float32, {})
    gpt = gpt_from_hf(hf_model, sequence_parallel=args.sequence_parallel, params_dtype=dtype, pipeline_dtype=dtype,
                      bf16=args.bf16, pre_process=ps.is_pipeline_first_stage(),
                      post_process=ps.is_pipeline_last_stage())
    del hf_model
    if torch.cuda.is_available():
        gpt.cuda()
    return gpt


def wrap_for_training(gpt, args):
    """(model in Megatron's DDP, optimizer, scheduler) for a GPT BeamLoRA was applied to: the optimizer keeps weight
    decay off the score table, the scheduler applies the learning rate and the groups' weight decay each step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    distributed = not args.plain_optimizer
    model = DistributedDataParallel(config=gpt.config, module=gpt, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True))
    gpt.config.no_sync_func, gpt.config.finalize_model_grads_func = model.no_sync, finalize_model_grads
    optimizer_config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=0.0, weight_decay=args.weight_decay,
                                       bf16=args.bf16, clip_grad=args.clip_grad, use_distributed_optimizer=distributed)
    optimizer = get_megatron_optimizer(optimizer_config, [model],
                                       config_overrides=megatron_optimizer_overrides(optimizer_config))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=0.0, lr_warmup_steps=args.warmup_steps,
        lr_decay_steps=args.steps, lr_decay_style="cosine", start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.steps, wd_incr_style="constant")
    return model, optimizer, scheduler


def sequences(args) -> List[Dict[str, torch.Tensor]]:
    """Every example as one fixed-length sequence: tokens, next-token labels, and a loss mask over the response
    (Megatron's vocabulary-parallel loss takes no ignore index, so the mask does its work)."""
    tokenizer = load_tokenizer(model_path(args.model_name_or_path))
    rows = data_lib.load_examples(args.dataset, builtin_size=args.examples, seed=args.seed)
    examples = data_lib.tokenize_examples(rows, tokenizer, max_length=args.seq_length + 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for example in examples:
        ids = example["input_ids"] + [pad] * (args.seq_length + 1 - len(example["input_ids"]))
        labels = example["labels"] + [data_lib.IGNORE_INDEX] * (args.seq_length + 1 - len(example["labels"]))
        target = torch.tensor(labels[1:])
        out.append({"tokens": torch.tensor(ids[:-1]), "labels": target.clamp(min=0),
                    "loss_mask": (target != data_lib.IGNORE_INDEX).float()})
    return out


def step_batches(examples, args, dp: int, dp_rank: int, start_step: int) -> Iterator[List[dict]]:
    """Per optimizer step, this data-parallel rank's micro-batches (data.micro_batches' order: the same examples
    whatever the number of processes, and after a resume)."""
    order = data_lib.micro_batches(len(examples), args.micro_batch_size, dp, dp_rank, args.seed,
                                   start_micro_step=start_step * args.accumulation, accumulation=args.accumulation)
    while True:
        yield [collate([examples[i] for i in next(order)]) for _ in range(args.accumulation)]


def collate(rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def forward_step(data_iterator, model):
    """Megatron's forward step: the model's per-token loss, averaged over the response tokens."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels, mask = (batch[k].to(device) for k in ("tokens", "labels", "loss_mask"))
    seq = tokens.shape[1]
    positions = torch.arange(seq, device=device).unsqueeze(0).expand_as(tokens)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)[None, None]
    per_token = model(input_ids=tokens, position_ids=positions, attention_mask=causal, labels=labels)

    def loss_func(output):
        loss = (output.float() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach().clone()}  # a copy: the schedule divides `loss` in place

    return per_token, loss_func


def whole_model_modules(beam) -> int:
    """The number of BeamLoRA modules of every pipeline stage (this process holds its stage's; collective)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    count = torch.tensor([len(beam.modules)], device=comm_device(group))
    torch.distributed.all_reduce(count, group=group)
    return int(count.item())


def train_step(model, optimizer, scheduler, beam, micro_batches, seq_length: int):
    """One optimizer step over the micro-batches, then BeamLoRA's step; (mean loss over the data-parallel
    processes, reset record). The loss is the last pipeline stage's, which every stage receives."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=len(micro_batches[0]["tokens"]), forward_only=False)
    optimizer.step()
    scheduler.step(increment=1)
    record = beam.step(optimizer)
    group = ps.get_pipeline_model_parallel_group()
    loss = (torch.stack([d["loss"].float() for d in losses]).mean() if losses  # only the last stage has losses
            else torch.zeros((), device=comm_device(group)))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
    return loss.item() / ps.get_data_parallel_world_size(), record


def output_paths(output_dir: str) -> Dict[str, str]:
    return {"adapter": os.path.join(output_dir, "adapter"), "checkpoints": os.path.join(output_dir, "checkpoints"),
            "log": os.path.join(output_dir, "log.jsonl")}
