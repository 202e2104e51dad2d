"""The worker behind benchmarks/overhead.py and benchmarks/quality.py: one `deepspeed` launch that trains
stock peft LoRA and/or BeamLoRA on the built-in model and task, and writes raw measurements as JSON (rank 0).

    deepspeed --num_gpus 2 --master_port P benchmarks/bench_worker.py --task overhead --stage 3 --out o.json

Methods, all with the same r, alpha, dropout 0, the 7 Llama projections, the same lora_A initialisation (drawn
once per seed and copied into every method, B = 0), the same batches and the same DeepSpeed config:
  lora      stock peft `get_peft_model(LoraConfig(...))`
  frozen    `beamlora_ds.apply` with every `lora_score` frozen and no controller: vanilla LoRA through our module
  beamlora  full BeamLoRA: `beam.step(engine)` after every `engine.step()`
Tasks:
  overhead  build an engine per method in this one process, then train them round-robin (one step each, the
            order rotated every step) so machine noise hits all alike; time every step, its phases and the
            controller separately; optionally profile a few steps of lora and beamlora (--profile_steps)
  memory    one method, a few steps through the first snapshot and reset; peak resident memory of this process
  quality   for each seed and method in turn: train with warmup + cosine lr, then exact match on held-out
            questions (generated with another seed, none of them in the training set)
`run` (launcher side) starts this worker and returns its JSON, so the two orchestrators share it.
"""
import argparse
import copy
import gc
import json
import math
import os
import resource
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("lora", "frozen", "beamlora")


# --------------------------------------------------------------------------------------- launcher side
def run(worker_args, nproc=2, timeout=3600, script=__file__) -> dict:
    """Run this worker (or another benchmark worker `script` with the same --out contract) under
    `deepspeed --num_gpus nproc` (beamlora_ds.testing: timeout, retry, /dev/shm clean-up), echo rank 0's progress
    lines, and return the JSON it wrote."""
    from beamlora_ds import testing

    return testing.launch_for_json(script, worker_args, "--out", nproc=nproc, timeout=timeout, cwd=ROOT,
                                   echo_prefix="[bench] ")


# ------------------------------------------------------------------------------------------ worker side
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("overhead", "memory", "quality"), required=True)
    p.add_argument("--stage", type=int, default=3, choices=(2, 3))
    p.add_argument("--model", default="builtin", help="builtin (SmolLM2-135M if installed) or builtin-tiny")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_ratio", type=float, default=0.1, help="quality: warmup share of the cosine schedule")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3, help="overhead: first steps left out of the timing")
    p.add_argument("--interval", type=int, default=6)
    p.add_argument("--p0", type=float, default=0.8)
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval_samples", type=int, default=64)
    p.add_argument("--eval_before", action="store_true", help="quality: also score the untrained model per seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--profile_steps", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's own log messages")
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args(argv)


_START = time.time()


def say(rank, text):
    if rank == 0:
        print(f"[bench] [{time.time() - _START:5.0f} s] {text}", flush=True)


class Bench:
    """What every task shares: distributed setup, tokenizer, data, DeepSpeed config, and building a method."""

    def __init__(self, args):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from beamlora_ds.backends.deepspeed.config import load_ds_config
        from beamlora_ds.loading import builtin, models
        from beamlora_ds.train import data, ds_config_auto, lr_schedule, processes

        self.args, self.torch, self.data, self.models = args, torch, data, models
        self.processes, self.lr_schedule = processes, lr_schedule
        import logging

        if not args.verbose:
            for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "beamlora_ds"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
        self.rank, self.world = self.processes.init_distributed(900)
        import deepspeed
        import deepspeed.comm as dist

        self.deepspeed, self.dist = deepspeed, dist
        threads = args.threads or max(1, (os.cpu_count() or 1) // self.world)
        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        name = builtin.resolve_builtin(args.model)
        self.model_name = name
        self.path = models.model_path(name, self.rank, barrier=dist.barrier)
        self.tokenizer = models.load_tokenizer(self.path)
        raw = load_ds_config(os.path.join(ROOT, "ds_configs", f"zero{args.stage}.json"))
        self.config = ds_config_auto.fill_before_loading(raw, self.world, ds_config_auto.CommandLine(
            micro_batch=args.micro_batch, accumulation=1, max_grad_norm=args.max_grad_norm, bf16=False,
            learning_rate=args.lr, weight_decay=0.0))
        self.ds_config_auto = ds_config_auto
        self.final_config = None

    # ------------------------------------------------------------------------------------------- data
    def examples(self, seed):
        rows = self.data.load_examples(None, seed=seed)
        return rows, self.data.tokenize_examples(rows, self.tokenizer, self.data.DEFAULT_TEMPLATE, self.args.max_length)

    def batch_plan(self, examples, seed, steps):
        """Per step: this process's micro-batch and the non-pad tokens of the whole global batch (all ranks)."""
        gens = [self.data.micro_batches(len(examples), self.args.micro_batch, self.world, r, seed)
                for r in range(self.world)]
        plan = []
        for _ in range(steps):
            indices = [next(g) for g in gens]
            tokens = sum(len(examples[i]["input_ids"]) for idx in indices for i in idx)
            plan.append((indices[self.rank], tokens))
        return plan

    def collate(self, examples, indices):
        return self.data.collate([examples[i] for i in indices], self.tokenizer.pad_token_id)

    # ---------------------------------------------------------------------------------------- models
    def load_base(self):
        return self.models.load_model(self.path, self.torch.float32, self.config)

    def a_init(self, model, seed):
        """lora_A for every target projection, kaiming-uniform(a=sqrt(5)) as peft and BeamLoRA both draw it,
        from one generator seeded by `seed`, so every method starts from the same adapter."""
        from beamlora_ds.method.config import LLAMA_PROJECTIONS
        from beamlora_ds.method.inject import matches_target

        g = self.torch.Generator().manual_seed(seed)
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, self.torch.nn.Linear) and matches_target(name, LLAMA_PROJECTIONS):
                a = self.torch.empty(self.args.r, module.in_features)
                self.torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
                out[name] = a
        return out

    def build(self, method, seed, total_steps, warmup_steps=None):
        """(engine, controller or None, [(in, out) of each adapted layer]) for one method, lora_A set from `seed`."""
        import beamlora_ds
        from beamlora_ds.method.config import LLAMA_PROJECTIONS, BeamLoRAConfig

        torch, args = self.torch, self.args
        model = self.load_base()
        init = self.a_init(model, seed)
        beam = None
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora import LoraLayer

            model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                                                     target_modules=list(LLAMA_PROJECTIONS)))
            adapters = {name[len("base_model.model."):]: m.lora_A["default"].weight
                        for name, m in model.named_modules() if isinstance(m, LoraLayer)}
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
            modules = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, LoraLayer)]
        else:
            beam = beamlora_ds.apply(model, BeamLoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0,
                                                           target_modules=list(LLAMA_PROJECTIONS),
                                                           interval=args.interval, p0=args.p0,
                                                           total_steps=total_steps, seed=seed))
            if method == "frozen":
                for m in beam.modules:
                    m.score_parameter.requires_grad_(False)
            adapters = {name: m.lora_A for name, m in zip(beam.module_names, beam.modules)}
            groups = [g for g in beamlora_ds.optimizer_param_groups(model, 0.0) if g["params"]]
            modules = [(m.in_features, m.out_features) for m in beam.modules]
        if sorted(adapters) != sorted(init):
            raise RuntimeError(f"{method}: adapted modules differ from the target projections")
        with torch.no_grad():
            for name, weight in adapters.items():
                weight.copy_(init[name])
        # the same config for every method: adapters resident under ZeRO-3 (threshold from the layer shapes)
        threshold = 1 + max(max(self.args.r * i, o * self.args.r) for i, o in modules)
        config = self.ds_config_auto.fill_for_model(
            self.config, learning_rate=args.lr, total_steps=total_steps, warmup_steps=warmup_steps or 0,
            hidden_size=getattr(model.config, "hidden_size", None), persistence_threshold=threshold)
        config["zero_allow_untested_optimizer"] = True
        self.final_config = config
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
        scheduler = None
        if warmup_steps is not None:  # quality: train.py's warmup + cosine
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule.lr_lambda("cosine", warmup_steps,
                                                                                              total_steps))
        engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=groups,
                                                    lr_scheduler=scheduler, config=copy.deepcopy(config))
        return engine, beam, modules

    def loss(self, engine, batch):
        with self.torch.no_grad():
            return float(engine(**batch).loss)

    def finish(self, result):
        if self.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump(result, f, indent=1)
        self.processes.release_shm_buffers(self.dist)

    def settings(self):
        a = self.args
        return {"stage": a.stage, "world": self.world, "threads_per_process": self.threads, "model": self.path,
                "model_name": self.model_name, "r": a.r, "alpha": a.alpha, "dropout": 0.0, "micro_batch": a.micro_batch,
                "max_length": a.max_length, "lr": a.lr, "max_grad_norm": a.max_grad_norm, "steps": a.steps,
                "interval": a.interval, "p0": a.p0, "torch": self.torch.__version__,
                "deepspeed": self.deepspeed.__version__}


# ----------------------------------------------------------------------------------------------- tasks
def train_step(bench, engine, beam, batch):
    """One optimizer step, barriers around it so the slower process sets the time; returns times and loss."""
    dist, clock = bench.dist, time.perf_counter
    dist.barrier()
    t0 = clock()
    loss = engine(**batch).loss
    t1 = clock()
    engine.backward(loss)
    t2 = clock()
    engine.step()
    t3 = clock()
    dist.barrier()
    t4 = clock()
    record = beam.step(engine) if beam is not None else None
    dist.barrier()
    t5 = clock()
    return {"step_s": t5 - t0, "train_s": t4 - t0, "controller_s": t5 - t4, "forward_s": t1 - t0,
            "backward_s": t2 - t1, "optimizer_s": t3 - t2, "loss": float(loss)}, record


def task_overhead(bench):
    args = bench.args
    methods = args.methods.split(",")
    seed = int(args.seeds.split(",")[0])
    _, examples = bench.examples(seed)
    plan = bench.batch_plan(examples, seed, args.steps + args.profile_steps)
    runs = {}
    for m in methods:
        runs[m] = bench.build(m, seed, args.steps)
        say(bench.rank, f"ZeRO-{args.stage}: built {m}")
    engine0, _, layers = next(iter(runs.values()))
    events = {"snapshot": [], "reset": []}
    if "beamlora" in runs:
        from beamlora_ds.method import algorithm

        events = {kind: [t for t in range(1, args.steps + 1) if fn(t, args.interval, args.steps)]
                  for kind, fn in (("snapshot", algorithm.is_snapshot_step), ("reset", algorithm.is_reset_step))}
    series = {m: {} for m in methods}
    resets = []
    for step in range(1, args.steps + 1):
        indices, _ = plan[step - 1]
        batch = {k: v.to(engine0.device) for k, v in bench.collate(examples, indices).items()}
        k = step % len(methods)
        for m in methods[k:] + methods[:k]:
            engine, beam, _ = runs[m]
            times, record = train_step(bench, engine, beam if m == "beamlora" else None, batch)
            for key, value in times.items():
                series[m].setdefault(key, []).append(value)
            if record is not None:
                resets.append({"step": record["step"], "keep_fraction": record["keep_fraction"],
                               "ranks_pruned": len(record["pruned"]),
                               "modules_touched": len({n for n, _ in record["pruned"]})})
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            say(bench.rank, f"ZeRO-{args.stage}: step {step}/{args.steps} " + " ".join(
                f"{m} {series[m]['step_s'][-1]:.3f}s" for m in methods))
    if args.profile_steps:
        profiled = profile(bench, runs, examples, plan[args.steps:], methods)
    # Before any update every method's first training forward is the base model (B = 0); the base model's own
    # loss comes from peft's switch that bypasses every adapter (the frozen base is the same after training).
    # Taken last: a forward without backward would disturb ZeRO-3's module trace before the timing.
    loss_at_init = {m: series[m]["loss"][0] for m in methods}
    if "lora" in methods:
        first = {k: v.to(engine0.device) for k, v in bench.collate(examples, plan[0][0]).items()}
        with runs["lora"][0].module.disable_adapter():
            loss_at_init["base"] = bench.loss(runs["lora"][0], first)
    result = {"task": "overhead", **bench.settings(), "seed": seed, "methods": methods, "modules": len(layers),
              "adapter_elements": sum(args.r * (i + o) for i, o in layers),
              "warmup": args.warmup, "events": events, "resets": resets, "loss_at_init": loss_at_init,
              "tokens_per_step": [t for _, t in plan[:args.steps]], "series": series,
              "ds_config": bench.final_config}
    if args.profile_steps:
        result["profile"] = profiled
    bench.finish(result)


def profile(bench, runs, examples, plan, methods):
    """torch.profiler over a few steps of lora and of beamlora; the top ops by self CPU time of each, and the ops
    whose time grows most from lora to beamlora (where BeamLoRA's extra time goes)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    out = {}
    for m in [x for x in ("lora", "frozen", "beamlora") if x in methods]:
        engine, beam, _ = runs[m]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for indices, _ in plan:
                batch = {k: v.to(engine.device) for k, v in bench.collate(examples, indices).items()}
                train_step(bench, engine, beam if m == "beamlora" else None, batch)
        ops = {e.key: {"self_cpu_ms": e.self_cpu_time_total / 1000 / len(plan), "calls": e.count / len(plan)}
               for e in prof.key_averages()}
        # what scales with the number of parameters and modules: collectives, DeepSpeed's per-parameter gradient
        # hooks (AccumulateGrad), and how many aten ops the dispatcher runs; then the top ops (the JSON stays small)
        out[m] = {"steps": len(plan), "total_self_cpu_ms": sum(v["self_cpu_ms"] for v in ops.values()),
                  "calls": {"collectives": {k.split("::")[1].strip("_"): v["calls"] for k, v in ops.items()
                                            if k.startswith("c10d::")},
                            "accumulate_grad": ops.get("torch::autograd::AccumulateGrad", {}).get("calls", 0),
                            "aten_ops": sum(v["calls"] for k, v in ops.items() if k.startswith("aten::"))},
                  "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:60])}
        say(bench.rank, f"ZeRO-{bench.args.stage}: profiled {len(plan)} steps of {m}")
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """The highest resident memory of this process while active, sampled every 2 ms in a thread (torch ops
    release the GIL, so it sees the peaks inside forward and backward)."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def task_memory(bench):
    """One method alone in this process: RSS before training, the sampled peak while training through a snapshot
    and a reset, and the process's lifetime max RSS (which also holds the model-loading peak)."""
    args = bench.args
    (method,) = args.methods.split(",")
    seed = int(args.seeds.split(",")[0])
    _, examples = bench.examples(seed)
    plan = bench.batch_plan(examples, seed, args.steps)
    total = max(args.steps, 2 * args.interval)  # the first reset must be scheduled within these steps
    engine, beam, _ = bench.build(method, seed, total)
    gc.collect()
    before = rss_mb()
    with RssSampler() as sampler:
        for indices, _ in plan:
            batch = {k: v.to(engine.device) for k, v in bench.collate(examples, indices).items()}
            train_step(bench, engine, beam if method == "beamlora" else None, batch)
    peaks = [None] * bench.world
    bench.dist.all_gather_object(peaks, {"rss_before_train_mb": before, "peak_rss_train_mb": sampler.peak,
                                         "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    resets = len(beam.history) if beam is not None and method == "beamlora" else 0
    say(bench.rank, f"ZeRO-{args.stage} memory {method}: peak while training "
        f"{max(p['peak_rss_train_mb'] for p in peaks):.0f} MB per process ({resets} resets)")
    bench.finish({"task": "memory", **bench.settings(), "method": method, "per_process": peaks, "resets": resets})


def held_out(bench, rows, n, seed):
    """n questions from another seed's generator that are not in the training rows (and not repeated)."""
    seen, out = {r["prompt"] for r in rows}, []
    for row in bench.data.arithmetic_examples(20 * n, seed=10_000 + seed):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            out.append(row)
            if len(out) == n:
                return out
    raise RuntimeError("could not draw enough held-out questions")


def task_quality(bench):
    from beamlora_ds.train.evaluate import exact_match

    args, torch = bench.args, bench.torch
    warmup = int(args.warmup_ratio * args.steps)
    results = []

    def evaluate(engine, rows):
        def all_reduce(t):
            t = t.to(engine.device)
            bench.dist.all_reduce(t)
            return t.cpu()

        return exact_match(engine.module, bench.tokenizer, rows, bench.data.DEFAULT_TEMPLATE, rank=bench.rank,
                           world_size=bench.world, synced_gpus=args.stage == 3, all_reduce=all_reduce)

    for seed in [int(s) for s in args.seeds.split(",")]:
        rows, examples = bench.examples(seed)
        eval_rows = held_out(bench, rows, args.eval_samples, seed)
        plan = bench.batch_plan(examples, seed, args.steps)
        for i, method in enumerate(args.methods.split(",")):
            tick = time.time()
            engine, beam, _ = bench.build(method, seed, args.steps, warmup_steps=warmup)
            before = evaluate(engine, eval_rows) if args.eval_before and i == 0 else None
            losses = []
            for indices, _ in plan:
                batch = {k: v.to(engine.device) for k, v in bench.collate(examples, indices).items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                if method == "beamlora":
                    beam.step(engine)
                mean = torch.tensor([float(loss)], device=engine.device)
                bench.dist.all_reduce(mean)
                losses.append(float(mean[0]) / bench.world)
            score = evaluate(engine, eval_rows)
            resets = [{"step": h["step"], "keep_fraction": h["keep_fraction"], "ranks_pruned": len(h["pruned"])}
                      for h in (beam.history if method == "beamlora" else [])]
            results.append({"seed": seed, "method": method, "exact_match": score, "exact_match_before": before,
                            "eval_questions": len(eval_rows), "losses": losses, "resets": resets,
                            "seconds": time.time() - tick})
            say(bench.rank, f"seed {seed} {method}: exact match {score:.1%} on {len(eval_rows)} held-out questions, "
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {len(resets)} resets, {time.time() - tick:.0f} s")
            engine.destroy()
            del engine, beam
            gc.collect()
            if bench.rank == 0:  # after every run, so a crash late in a long run keeps what was measured
                with open(args.out, "w") as f:
                    json.dump({"task": "quality", **bench.settings(), "warmup_steps": warmup,
                               "eval_samples": args.eval_samples, "runs": results}, f, indent=1)
    bench.finish({"task": "quality", **bench.settings(), "warmup_steps": warmup, "eval_samples": args.eval_samples,
                  "runs": results})


def main():
    args = parse()
    bench = Bench(args)
    say(bench.rank, "set up")
    {"overhead": task_overhead, "memory": task_memory, "quality": task_quality}[args.task](bench)


if __name__ == "__main__":
    main()
