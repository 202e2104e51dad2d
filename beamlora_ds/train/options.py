"""launch/train.py's command line: every flag, its defaults (the built-in run's for a built-in model, named or not;
the paper's reference run for any other model), and --help naming both."""
from __future__ import annotations

import argparse
import os

from ..loading.builtin import BUILTIN_NAMES
from ..method.config import LLAMA_PROJECTIONS
from . import data as data_lib
from .checks import UsageError

# Defaults for a built-in model (no --model_name_or_path, or a built-in name): small enough for a CPU in minutes.
BUILTIN_DEFAULTS = dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, interval=10, p0=0.8, max_steps=30,
                        learning_rate=1e-3, per_device_train_batch_size=4, max_length=64, eval_samples=64,
                        warmup_ratio=0.1, logging_steps=1, save_steps=20, output_dir="outputs/builtin")
# Defaults for any other model (the paper's reference run on a 7B model, docs/method.md section 7).
PAPER_DEFAULTS = dict(lora_r=64, lora_alpha=128.0, lora_dropout=0.05, interval=3000, p0=0.95, max_steps=-1,
                      learning_rate=3e-4, per_device_train_batch_size=4, max_length=512, eval_samples=0,
                      warmup_ratio=0.03, logging_steps=10, save_steps=500, output_dir=None)


# ------------------------------------------------------------------------------------------ the command line
def parse_args(argv=None, description: str = ""):
    """launch/train.py's options, parsed."""
    return make_parser(description).parse_args(argv)


def make_parser(description: str = "") -> argparse.ArgumentParser:
    """launch/train.py's parser; --help names each flag's default (the paper's run and the built-in run where they
    differ)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_groups in (_deepspeed_and_model_options, _data_options, _beamlora_options, _training_and_output_options):
        add_groups(p)
    return p


def _add(group, *flags, **options):
    """group.add_argument, its help ending in the default it takes: for the flags whose default depends on the run,
    the paper's and the built-in run's; else the flag's own (when it has one worth naming)."""
    key, text = options.get("dest") or flags[0].lstrip("-"), options.get("help")
    if text not in (None, argparse.SUPPRESS):
        if key in PAPER_DEFAULTS:
            paper = "required" if PAPER_DEFAULTS[key] is None else f"default {PAPER_DEFAULTS[key]!r}"
            text += f" ({paper}; built-in run {BUILTIN_DEFAULTS[key]!r})"
        elif options.get("default") not in (None, False) and "default" not in text:
            text += f" (default {options['default']!r})"
        options["help"] = text.replace("%", "%%")
    return group.add_argument(*flags, **options)


def _deepspeed_and_model_options(p):
    g = p.add_argument_group("DeepSpeed")
    _add(g, "--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON (ds_configs/*.json)")
    _add(g, "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    _add(g, "--dist_timeout", type=int, default=1800, help="seconds before a stuck collective fails")
    g = p.add_argument_group("model")
    _add(g, "--model_name_or_path", default=None,
         help="hub name or local folder; default: built-in (SmolLM2-135M if installed, else tiny Llama)")
    _add(g, "--bf16", action="store_true", default=None, help="train in bf16 (must match the config)")
    _add(g, "--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    _add(g, "--quantization", default="none", choices=["none", "nf4"],
         help="nf4: load the base in 4-bit NF4 with double quantization (QLoRA-style; needs bitsandbytes); "
              "compute dtype bf16 with --bf16, else fp32")


def _data_options(p):
    g = p.add_argument_group("data")
    _add(g, "--dataset", default=None, help="hub name, .json/.jsonl/.csv file, or a save_to_disk folder")
    _add(g, "--dataset_split", default="train", help="split of a hub dataset or folder")
    _add(g, "--prompt_field", default="prompt", help="field holding each example's prompt")
    _add(g, "--response_field", default="response", help="field holding the response (the loss is on it)")
    _add(g, "--prompt_template", default=data_lib.DEFAULT_TEMPLATE, help="must contain {prompt}")
    _add(g, "--max_length", type=int, default=None, help="tokens per example (longer ones are dropped)")
    _add(g, "--eval_samples", type=int, default=None, help="held-out built-in questions for exact match")


def _beamlora_options(p):
    g = p.add_argument_group("BeamLoRA")
    _add(g, "--lora_r", type=int, default=None, help="rank r of every adapter")
    _add(g, "--lora_alpha", type=float, default=None, help="scaling alpha (the update is alpha/r B w A x)")
    _add(g, "--lora_dropout", type=float, default=None, help="dropout on the adapter's input")
    _add(g, "--tau", type=float, default=0.05,
         help="softmax temperature of the rank scores (the paper uses 0.03 when lr < 1e-4)")
    _add(g, "--target_modules", default=",".join(LLAMA_PROJECTIONS),
         help="comma-separated names, or a regex if it starts with 're:'")
    _add(g, "--interval", type=int, default=None, help="reset interval T in optimizer steps")
    _add(g, "--p0", type=float, default=None,
         help="keep-fraction at the first reset; it rises to 1 along a half cosine")
    _add(g, "--t_end", type=int, default=None,
         help="step at which the keep-fraction reaches 1 (default: two thirds of the run)")
    _add(g, "--optimizer_state", default="inherit", choices=["inherit", "keep"],
         help="Adam moments of a refilled rank: the source's from the snapshot, or left as they were")
    _add(g, "--importance", default="score", choices=["score", "norm"],
         help="rank importance: the learned score, or ||b_i|| ||a_i||")


def _training_and_output_options(p):
    g = p.add_argument_group("training")
    _add(g, "--learning_rate", type=float, default=None, help="peak learning rate")
    _add(g, "--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"],
         help="after the warmup")
    _add(g, "--warmup_ratio", type=float, default=None, help="fraction of the steps with linear warmup")
    _add(g, "--weight_decay", type=float, default=0.0, help="on A and B (never on the score)")
    _add(g, "--max_grad_norm", type=float, default=None, help="default 1.0 (or the config's value)")
    _add(g, "--num_train_epochs", type=float, default=3.0, help="used when --max_steps is not > 0")
    _add(g, "--max_steps", type=int, default=None, help="optimizer steps; overrides epochs when > 0")
    _add(g, "--per_device_train_batch_size", type=int, default=None, help="examples per process per micro-step")
    _add(g, "--gradient_accumulation_steps", type=int, default=None,
         help="micro-steps per optimizer step (default 1, or the config's value)")
    _add(g, "--seed", type=int, default=42, help="data order, adapter init, reset pairing")
    g = p.add_argument_group("output")
    _add(g, "--output_dir", default=None, help="run folder: checkpoints, adapter, log.jsonl, run_args.json")
    _add(g, "--overwrite_output_dir", action="store_true", help="write into a non-empty output_dir")
    _add(g, "--resume", nargs="?", const="latest", default=None, choices=["latest", "auto"],
         help="continue from the checkpoint `latest` names in output_dir (refused if it is damaged); "
              "'--resume auto': from the newest intact one. Another number of GPUs is fine if the global "
              "batch stays (docs/training.md)")
    _add(g, "--allow_new_global_batch", action="store_true",
         help="let --resume change the global batch (the data order changes)")
    _add(g, "--save_steps", type=int, default=None, help="checkpoint every N optimizer steps; 0: at the end")
    _add(g, "--save_base", action="store_true",
         help="checkpoints hold the frozen base too (model-sized: 138 GB more per checkpoint at 70B in bf16); by "
              "default they hold the adapter and its optimizer state, and --resume loads the base from "
              "--model_name_or_path again (docs/checkpoints.md)")
    _add(g, "--logging_steps", type=int, default=None, help="a log.jsonl record every N steps")
    _add(g, "--stop_after", type=int, default=0,
         help="checkpoint and exit after this step (to fit a job time limit; continue with --resume)")


def fill_defaults(args):
    """The defaults follow the model: the built-in run's for a built-in one (r 8 fits its 64-wide projections; the
    paper's r 64 and 3000-step interval do not), the paper's otherwise; explicit flags always win. Only the offline
    demo (built-in model and data) has a default output folder."""
    args.builtin_model = args.model_name_or_path in BUILTIN_NAMES
    args.builtin = args.builtin_model and args.dataset is None
    args.explicit = sorted(k for k, v in vars(args).items() if v is not None)
    for key, value in (BUILTIN_DEFAULTS if args.builtin_model else PAPER_DEFAULTS).items():
        if getattr(args, key) is None and not (key == "output_dir" and not args.builtin):
            setattr(args, key, value)
    if args.output_dir is None:
        raise UsageError("--output_dir is required when a model or dataset is given.")
    return args
