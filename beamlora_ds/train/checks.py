"""What launch/train.py refuses in its own input before anything is loaded, as one line naming the flag to fix.

Option values no run can use, the DeepSpeed config against the command line, the BeamLoRA settings (named by the
flag the user typed, not the config field), the output folder (never written into by surprise; a resume must keep
the settings its checkpoint was made with), and --target_modules / --lora_r against the model's architecture on a
weightless skeleton.
"""
from __future__ import annotations

import json
import logging
import os
import re

from ..loading import models
from ..method.config import RESUME_FIELDS, BeamLoRAConfig, ConfigError
from ..method.inject import check_targets
from ..backends.deepspeed.autotp import tensor_parallel_problem
from ..backends.deepspeed.config import autotp_size
from .ds_config_auto import CommandLine, fill_before_loading

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A mistake in the command line, config or data: reported as one line, exit code 2, nothing written."""


# BeamLoRAConfig field -> the flag that sets it: refusals name the flag the user typed
CONFIG_FLAGS = {"r": "--lora_r", "alpha": "--lora_alpha", "dropout": "--lora_dropout", "tau": "--tau", "p0": "--p0",
                "interval": "--interval", "t_end": "--t_end", "target_modules": "--target_modules",
                "optimizer_state": "--optimizer_state", "importance": "--importance", "seed": "--seed"}
# What else a resumed run must keep: the base, the data and its order, the run's length (total_steps)
RUN_RESUME_FLAGS = ("--model_name_or_path", "--dataset", "--target_modules", "--max_steps",
                    "--per_device_train_batch_size", "--gradient_accumulation_steps", "--quantization")
RESUME_FLAGS = tuple(CONFIG_FLAGS[f] for f in RESUME_FIELDS if f in CONFIG_FLAGS) + RUN_RESUME_FLAGS
# How a step's global batch is split may change on resume (another number of GPUs), as long as the global batch
# stays (check_resume_batch); run_args.json records it under this key.
BATCH_SPLIT_FLAGS = ("--per_device_train_batch_size", "--gradient_accumulation_steps")
GLOBAL_BATCH = "global_batch"


def check_output_dir(args):
    """Never write into a non-empty output dir by surprise; never resume from nothing or with other settings."""
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    if args.resume:
        if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
            raise UsageError(f"--resume but {ckpt_dir} has no checkpoint ('latest' file). Drop --resume to "
                             "start a new run.")
        before = saved_run_args(args.output_dir)
        if before is not None:
            keys = [flag[2:] for flag in RESUME_FLAGS if flag not in BATCH_SPLIT_FLAGS]
            changed = [f"--{k}: was {before.get(k)!r}, now {getattr(args, k)!r}" for k in keys
                       if k in before and before[k] != getattr(args, k)]
            if changed:
                raise UsageError("--resume with different settings than the checkpoint's run: "
                                 + "; ".join(changed) + ". Use the original settings or a new --output_dir.")
    elif os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        raise UsageError(f"output dir {args.output_dir!r} is not empty. Pass --resume to continue its run, "
                         "--overwrite_output_dir to write into it anyway, or choose another --output_dir.")
    return ckpt_dir


# (flag, smallest valid value, what it means) of numeric options no DeepSpeed config or model can fix
_AT_LEAST = (("logging_steps", 1, "log every N optimizer steps"),
             ("save_steps", 0, "checkpoint every N optimizer steps; 0: only at the end"),
             ("stop_after", 0, "checkpoint and exit after optimizer step N; 0: run to the end"),
             ("max_length", 1, "tokens per example"),
             ("eval_samples", 0, "held-out questions; 0: no evaluation"),
             ("per_device_train_batch_size", 1, "examples per process per micro-step"),
             ("gradient_accumulation_steps", 1, "micro-steps per optimizer step"),
             ("dist_timeout", 1, "seconds"))


def check_arguments(args):
    """Option values no run can use, refused before anything is read."""
    for key, low, meaning in _AT_LEAST:
        value = getattr(args, key)
        if value is not None and value < low:
            raise UsageError(f"--{key} {value} is out of range: use an integer >= {low} ({meaning}).")
    if not 0 <= args.warmup_ratio < 1:
        raise UsageError(f"--warmup_ratio {args.warmup_ratio} is out of range: use a fraction of the run in [0, 1).")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate {args.learning_rate}: use a positive learning rate (e.g. 3e-4).")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise UsageError(f"--num_train_epochs {args.num_train_epochs} with no --max_steps: the run would have no "
                         "step. Give a positive --num_train_epochs or --max_steps.")
    try:
        filled = args.prompt_template.format(prompt="\0")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--prompt_template {args.prompt_template!r} cannot be filled ({type(e).__name__}: {e}): "
                         "its only field may be {prompt}; write literal braces as {{ and }}.") from e
    if "\0" not in filled:
        raise UsageError(f"--prompt_template {args.prompt_template!r} has no {{prompt}}: add {{prompt}} where the "
                         "example's prompt goes (default: 'Question: {prompt}\\nAnswer: ').")
    if args.dataset and os.path.isfile(args.dataset) and _blank(args.dataset):
        raise UsageError(f"--dataset {args.dataset!r} is an empty file: add examples with a {args.prompt_field!r} and "
                         f"a {args.response_field!r} field (or point --dataset at another file).")


def _blank(path: str) -> bool:
    """Whether a file holds nothing but whitespace (reads only up to its first other character)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def make_beam_config(args, total_steps: int) -> BeamLoRAConfig:
    """The validated BeamLoRAConfig of this run; its problems refused on one line, by flag name."""
    targets = args.target_modules[3:] if args.target_modules.startswith("re:") else args.target_modules.split(",")
    config = BeamLoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, tau=args.tau,
                            target_modules=targets, interval=args.interval, p0=args.p0, t_end=args.t_end,
                            total_steps=total_steps, optimizer_state=args.optimizer_state,
                            importance=args.importance, seed=args.seed)
    try:
        return config.validate()
    except ConfigError as e:
        problems = str(e).split("\n  - ")[1:] or [str(e)]
        raise UsageError("; ".join(by_flag(p) for p in problems)) from e


def by_flag(problem: str) -> str:
    """'r=0: ...' -> '--lora_r=0: ...': a refusal names the flag the user typed, not the config field."""
    return re.sub(r"^(\w+)=", lambda m: f"{CONFIG_FLAGS.get(m[1], m[1])}=", problem)


def check_targets_before_loading(path: str, beam_config: BeamLoRAConfig):
    """Targets that match nothing, or an r too large for a layer, found on a weightless (meta-device) skeleton
    built from the model's config, before any weight is read; beamlora_ds.apply checks the loaded model again."""
    try:
        skeleton = models.meta_skeleton(path)
    except OSError as e:  # no readable config: loading the weights would fail the same way
        raise UsageError(f"--model_name_or_path {path!r}: cannot read the model's config ({e}). Pass a local "
                         "folder holding config.json, or a hub name (cached, or with network access).") from e
    except Exception as e:  # an architecture the skeleton cannot be built for: apply() still checks after loading
        logger.warning("could not build %s on the meta device to check --target_modules before loading (%s: %s); "
                       "they are checked after loading", path, type(e).__name__, e)
        return
    try:
        check_targets(skeleton, beam_config)
    except (ValueError, TypeError) as e:
        raise UsageError(by_flag(str(e))) from e


def from_cli(args, key: str, config: dict, config_key: str, default):
    """What the command line says about a value the DeepSpeed config may also set: the flag if given; else
    None when the config has a value (the config wins); else the default (the config is "auto" or silent)."""
    if key in args.explicit:
        return getattr(args, key)
    if config.get(config_key, "auto") != "auto":
        return None
    return default


def tensor_parallel_degree(args, raw_config: dict) -> int:
    """The DeepSpeed config's tensor-parallel degree (autotp_size). Under tensor parallelism the LoRA dropout
    defaults to 0 (it needs 0, docs/tensor_parallel.md); a dropout given on the command line is refused later."""
    tp = autotp_size(raw_config)
    if tp > 1 and "lora_dropout" not in args.explicit and args.lora_dropout:
        args.lora_dropout = 0.0
    return tp


def check_tensor_parallel(tp: int, world_size: int, args=None, beam_config=None, model_config=None) -> None:
    """What tensor parallelism cannot train, refused before loading: autotp_size and the processes; with `args`
    4-bit and dropout, with `beam_config` fused targets, with `model_config` the heads."""
    problem = tensor_parallel_problem(
        tp, world_size, model_config, four_bit=args is not None and args.quantization == "nf4",
        dropout=args.lora_dropout if args is not None else 0.0,
        targets=beam_config.target_modules if beam_config is not None else ())
    if problem:
        raise UsageError(problem)


def saved_run_args(output_dir: str):
    """The run_args.json a run wrote into `output_dir` (None when there is none)."""
    path = os.path.join(output_dir, "run_args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def global_batch_record(config: dict, replicas: int) -> dict:
    """How a step's examples are split: what run_args.json keeps for check_resume_batch."""
    return {"train_batch_size": config["train_batch_size"], "per_device": config["train_micro_batch_size_per_gpu"],
            "accumulation": config["gradient_accumulation_steps"], "data_parallel": replicas}


def check_resume_batch(args, config: dict, replicas: int) -> None:
    """A resume may split the global batch otherwise (another number of GPUs: a new micro-batch or accumulation),
    never change it unless asked: the data order and the run it continues are defined by it (data.micro_batches)."""
    before = saved_run_args(args.output_dir) if args.resume else None
    if not before or args.allow_new_global_batch:
        return
    if GLOBAL_BATCH not in before:
        raise UsageError(f"--resume of a run whose run_args.json has no {GLOBAL_BATCH!r} record: an earlier development "
                         "version of beamlora_ds wrote it, so the batch it trained with cannot be checked. Resume it "
                         "with that version, start a new run, or pass --allow_new_global_batch if per-process batch x "
                         "accumulation x processes stays what it was.")
    was, now = before[GLOBAL_BATCH], global_batch_record(config, replicas)
    if was["train_batch_size"] == now["train_batch_size"]:
        return
    fits = [f"--gradient_accumulation_steps {was['train_batch_size'] // (m * replicas)}"
            + ("" if m == now["per_device"] else f" --per_device_train_batch_size {m}")
            for m in (now["per_device"], was["per_device"]) if was["train_batch_size"] % (m * replicas) == 0]
    fix = (f"keep it with {fits[0]} (or the same in the ds_config, if it sets them)" if fits else
           f"no micro-batch x accumulation on {replicas} data-parallel processes makes {was['train_batch_size']}")
    raise UsageError(
        f"--resume with another global batch: the checkpoint's run took {was['train_batch_size']} examples per step "
        f"({was['per_device']} per process x {was['accumulation']} accumulation x {was['data_parallel']} processes), "
        f"this launch would take {now['train_batch_size']} ({now['per_device']} x {now['accumulation']} x "
        f"{replicas}). To continue the same run, {fix}; or pass --allow_new_global_batch to go on with the new one "
        "(the data order then changes and the run no longer follows the one it continues).")


def resolve_batch(args, raw_config: dict, world_size: int) -> dict:
    """The DeepSpeed config with the values the command line knows filled (batch sizes for `world_size` data-parallel
    processes, clipping, precision, the optimizer's); a value the config and the command line set differently is
    refused."""
    given = CommandLine(
        micro_batch=from_cli(args, "per_device_train_batch_size", raw_config, "train_micro_batch_size_per_gpu",
                             args.per_device_train_batch_size),
        accumulation=from_cli(args, "gradient_accumulation_steps", raw_config, "gradient_accumulation_steps", 1),
        max_grad_norm=from_cli(args, "max_grad_norm", raw_config, "gradient_clipping", 1.0),
        bf16=args.bf16, learning_rate=args.learning_rate, weight_decay=args.weight_decay)
    return fill_before_loading(raw_config, world_size, given)
