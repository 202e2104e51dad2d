"""Fine-tune a Hugging Face Llama-family model with BeamLoRA on megatron-core: tensor, sequence and pipeline
parallelism, Megatron's DistributedOptimizer (or its plain one), data parallelism over the rest of the processes.

    torchrun --nproc_per_node 2 launch/train_megatron.py --tensor_parallel 2 --sequence_parallel \\
        --output_dir out/megatron                                  # the built-in default: builtin-tiny, arithmetic
    torchrun --nnodes 8 --nproc_per_node 8 ... launch/train_megatron.py \\
        --model_name_or_path meta-llama/Llama-2-70b-hf --tensor_parallel 8 --sequence_parallel --bf16 \\
        --dataset my.jsonl --steps 2000 --interval 200 --output_dir out/70b

The model is converted to a Megatron GPT on every process, each holding its pipeline stage's layers
(backends/megatron/hf_llama.py); every projection gets a BeamLoRA adapter (fused qkv and gate/up: one each); resets
run on schedule over every stage's modules; checkpoints every --save_every steps resume exactly (--resume); the end
writes a stock peft adapter for the HF model (every stage's layers). docs/megatron.md.
"""
import argparse
import logging
import os
import sys
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beamlora_ds  # noqa: E402
from beamlora_ds.loading.builtin import BUILTIN_TINY, resolve_builtin  # noqa: E402
from beamlora_ds.loading.models import load_config, model_path  # noqa: E402
from beamlora_ds.train import megatron_run as run  # noqa: E402
from beamlora_ds.train.checks import UsageError  # noqa: E402
from beamlora_ds.train.data import DataError  # noqa: E402

logger = logging.getLogger("beamlora_ds.train_megatron")
logger.setLevel(logging.INFO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_name_or_path", default=BUILTIN_TINY, help="HF Llama/Mistral/Qwen2 (default builtin-tiny)")
    p.add_argument("--dataset", default=None, help="prompt/response data (default: the built-in arithmetic task)")
    p.add_argument("--examples", type=int, default=2000, help="size of the built-in task")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--tensor_parallel", type=int, default=1)
    p.add_argument("--sequence_parallel", action="store_true")
    p.add_argument("--pipeline_parallel", type=int, default=1, help="pipeline stages (each num_layers / N layers)")
    p.add_argument("--plain_optimizer", action="store_true", help="Megatron's plain optimizer, not the distributed one")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step and process")
    p.add_argument("--seq_length", type=int, default=48, help="tokens per sequence (longer examples are dropped)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--clip_grad", type=float, default=1.0)
    p.add_argument("--lora_r", dest="r", type=int, default=8)
    p.add_argument("--lora_alpha", dest="alpha", type=float, default=None, help="default 2 x r")
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--interval", type=int, default=20, help="steps between resets")
    p.add_argument("--p0", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    p.add_argument("--log_every", type=int, default=10, help="a loss line every N steps")
    p.add_argument("--timeout_s", type=float, default=600)
    return p.parse_args(argv)


def check(args):
    """Everything refused before processes connect or weights load; returns the tokenized examples."""
    run.check_megatron_installed()
    run.check_runs_here()
    args.model_name_or_path = resolve_builtin(args.model_name_or_path)
    world = int(os.environ.get("WORLD_SIZE", 1))
    run.check_layout(args, world, load_config(model_path(args.model_name_or_path)))
    try:
        run.beam_config(args).validate()
    except ValueError as e:
        raise UsageError(str(e).replace("\n", " ")) from None
    checkpoints = run.output_paths(args.output_dir)["checkpoints"]
    if args.resume and not os.path.isdir(checkpoints):
        raise UsageError(f"--resume: {checkpoints} does not exist; start without --resume.")
    if args.resume and os.path.exists(run.output_paths(args.output_dir)["adapter"]):
        raise UsageError(f"--resume: {args.output_dir} holds a finished run (its adapter is written); choose another "
                         "--output_dir.")
    if not args.resume and os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is not empty; pass --resume to continue it, or choose "
                         "another folder.")
    try:
        return run.sequences(args)
    except DataError as e:
        raise UsageError(str(e)) from None


def connect(args):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s))
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel,
                                 pipeline_model_parallel_size=args.pipeline_parallel)
    model_parallel_cuda_manual_seed(args.seed)
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def newest_checkpoint(folder: str):
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("step-") and n[5:].isdigit())
    return (os.path.join(folder, f"step-{steps[-1]}"), steps[-1]) if steps else (None, 0)


def train(args, examples) -> None:
    dp, dp_rank = connect(args)
    is_zero = torch.distributed.get_rank() == 0
    hf_config = load_config(model_path(args.model_name_or_path))
    gpt = run.converted_gpt(args)
    beam = beamlora_ds.apply(gpt, run.beam_config(args))
    model, optimizer, scheduler = run.wrap_for_training(gpt, args)
    paths = run.output_paths(args.output_dir)
    start = 0
    if args.resume:
        folder, start = newest_checkpoint(paths["checkpoints"])
        if folder is not None:
            extra = beamlora_ds.load_megatron_checkpoint(folder, model, optimizer, beam)
            scheduler.load_state_dict(extra["scheduler"])
    modules = run.whole_model_modules(beam)
    if is_zero:
        logger.info("BeamLoRA on megatron-core: %s, tensor parallel %d%s, pipeline parallel %d, data parallel %d, %s "
                    "optimizer, %d modules, r=%d, steps %d (from %d)", args.model_name_or_path, args.tensor_parallel,
                    " + sequence parallel" if args.sequence_parallel else "", args.pipeline_parallel, dp,
                    "plain" if args.plain_optimizer else "distributed", modules, args.r, args.steps, start)
    batches = run.step_batches(examples, args, dp, dp_rank, start)
    began = time.time()
    for step in range(start, args.steps):
        loss, record = run.train_step(model, optimizer, scheduler, beam, next(batches), args.seq_length)
        beamlora_ds.log_reset(paths["log"], record)
        if is_zero and (record is not None or (step + 1) % args.log_every == 0 or step + 1 == args.steps):
            pruned = f", reset: {len(record['pruned'])} ranks pruned" if record is not None else ""
            logger.info("step %d/%d loss %.4f%s", step + 1, args.steps, loss, pruned)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            beamlora_ds.save_megatron_checkpoint(os.path.join(paths["checkpoints"], f"step-{step + 1}"), model,
                                                 optimizer, beam, {"scheduler": scheduler.state_dict()})
    beamlora_ds.save_megatron_adapter(model, paths["adapter"], hf_config, optimizer=optimizer,
                                      base_model_name_or_path=args.model_name_or_path)
    if is_zero:
        logger.info("done in %.0f s: %d resets; the peft adapter is in %s", time.time() - began, len(beam.history),
                    paths["adapter"])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("beamlora_ds").setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        examples = check(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(args, examples)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
