"""The worker behind benchmarks/tp_overhead.py: one `deepspeed` launch that trains on the built-in model with
DeepSpeed AutoTP (tensor parallelism) or ZeRO-3, and writes raw per-step measurements as JSON (rank 0).

    deepspeed --num_gpus 2 --master_port P benchmarks/tp_bench_worker.py --task pair --out o.json
    deepspeed --num_gpus 2 --master_port P benchmarks/tp_bench_worker.py --task single --mode zero3 --out o.json

Tasks:
  pair    TP (ds_configs/tp2_zero1.json: autotp_size = world, ZeRO-1) with two engines built in these processes:
            base      the AutoTP-split model without adapters; only the RMSNorm weights train (DeepSpeed needs
                      something to step; they are the smallest trainable set that still backpropagates through
                      every layer, as the adapters do)
            beamlora  beamlora_ds.apply + prepare_tensor_parallel, beam.step(engine) after every engine.step()
          trained round-robin, one step each (the order rotated every step), on the same batch
  single  one BeamLoRA engine, --mode tp (as in pair) or zero3 (ds_configs/zero3.json, no TP, adapters resident)
The data: --global_batch sequences of --seq_len random token ids per step (labels = inputs, no padding), drawn
from one seeded generator, so every process sees the same global batch. Under TP every process of the group
trains on the whole of it (data-parallel size 1); under ZeRO-3 each process takes its share of the rows (the same
sequences per step, the same work). A step is timed from a barrier before the forward to a barrier after
beam.step (bench_worker.train_step), so it is the slower process's time. After the timed steps, --comm_steps
more steps per engine count every torch.distributed collective (calls, elements, synchronous wait; rank 0).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench_worker  # noqa: E402
from bench_worker import say, train_step  # noqa: E402


# --------------------------------------------------------------------------------------- launcher side
def run(worker_args, nproc=2, timeout=3600) -> dict:
    """This worker under `deepspeed --num_gpus nproc`, launched as bench_worker launches itself."""
    return bench_worker.run(worker_args, nproc, timeout, script=__file__)


# ------------------------------------------------------------------------------------------ worker side
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("pair", "single"), required=True)
    p.add_argument("--mode", choices=("tp", "zero3"), default="tp", help="single: tensor parallel or ZeRO-3")
    p.add_argument("--model", default="builtin", help="builtin (SmolLM2-135M if installed) or builtin-tiny")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--global_batch", type=int, default=4, help="sequences per optimizer step (all processes)")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--interval", type=int, default=6)
    p.add_argument("--p0", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--comm_steps", type=int, default=2, help="steps per engine after the timing with every "
                   "torch.distributed collective counted (0: off)")
    p.add_argument("--out", required=True)
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's own log messages")
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args(argv)


class TPBench:
    """Distributed setup, data and engines (the `bench` that bench_worker.train_step takes: it needs .dist)."""

    def __init__(self, args):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import logging

        import torch

        from beamlora_ds.backends.deepspeed.config import load_ds_config
        from beamlora_ds.loading import builtin, models
        from beamlora_ds.train import ds_config_auto, processes

        if not args.verbose:
            for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "beamlora_ds"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
        self.args, self.torch, self.models, self.processes, self.dsc = args, torch, models, processes, ds_config_auto
        self.rank, self.world = processes.init_distributed(900)
        import deepspeed
        import deepspeed.comm as dist

        self.deepspeed, self.dist = deepspeed, dist
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // self.world))
        self.threads = torch.get_num_threads()
        self.model_name = builtin.resolve_builtin(args.model)
        self.path = models.model_path(self.model_name, self.rank, barrier=dist.barrier)
        self.model_config = models.load_config(self.path)
        self.tp = self.world if args.task == "pair" or args.mode == "tp" else 1
        self.replicas = self.world // self.tp
        if args.global_batch % self.replicas:
            raise SystemExit(f"--global_batch {args.global_batch} does not split over {self.replicas} replicas")
        self.micro = args.global_batch // self.replicas  # per process
        name = "tp2_zero1.json" if self.tp > 1 else "zero3.json"
        raw = load_ds_config(os.path.join(ROOT, "ds_configs", name))
        if self.tp > 1:
            raw["tensor_parallel"] = dict(raw.get("tensor_parallel") or {}, autotp_size=self.tp)
        self.config = ds_config_auto.fill_before_loading(raw, self.replicas, ds_config_auto.CommandLine(
            micro_batch=self.micro, accumulation=1, max_grad_norm=args.max_grad_norm, bf16=False, learning_rate=args.lr,
            weight_decay=0.0))
        self.final_configs = {}

    # ------------------------------------------------------------------------------------------- data
    def global_batches(self, steps):
        """The same global batches on every process: random ids (no special tokens), no padding."""
        torch, a = self.torch, self.args
        g = torch.Generator().manual_seed(1000 + a.seed)
        vocab = self.model_config.vocab_size
        return [torch.randint(4, vocab, (a.global_batch, a.seq_len), generator=g) for _ in range(steps)]

    def local_batch(self, ids):
        """This process's rows: all of them under TP (a TP group reads the same batch), its share under ZeRO-3."""
        replica = self.rank // self.tp
        mine = ids[replica * self.micro:(replica + 1) * self.micro]
        return {"input_ids": mine, "labels": mine.clone(), "attention_mask": self.torch.ones_like(mine)}

    # ---------------------------------------------------------------------------------------- engines
    def load(self):
        return self.models.load_model(self.path, self.torch.float32, self.config)

    def build_base(self, total_steps):
        """The AutoTP-split model without adapters, only its RMSNorm weights trainable."""
        torch = self.torch
        from deepspeed.module_inject.layers import set_autotp_mode
        from deepspeed.utils import groups

        from beamlora_ds.train.lr_schedule import lr_lambda

        groups._init_tp_mesh_device(tensor_model_parallel_size=self.tp)  # prepare_tensor_parallel does the same
        set_autotp_mode(training=True)
        model = self.load()
        for p in model.parameters():
            p.requires_grad_(False)
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        params = [m.weight for m in norms]
        for p in params:
            p.requires_grad_(True)
        hidden = self.model_config.hidden_size  # no adapters: HF's persistence threshold (10 x hidden)
        config = self.dsc.fill_for_model(self.config, learning_rate=self.args.lr, total_steps=total_steps,
                                         warmup_steps=0, hidden_size=hidden, persistence_threshold=10 * hidden)
        config["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=self.args.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, total_steps))
        engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config, mpu=groups)
        self.final_configs["base"] = config
        return engine, None, {"trainable": f"{len(params)} RMSNorm weights", "trainable_elements":
                              sum(p.numel() for p in params)}

    def build_beamlora(self, total_steps):
        """As launch/train.py: apply, prepare_tensor_parallel (nothing without TP), engine.initialize_engine."""
        import beamlora_ds
        from beamlora_ds.method.config import LLAMA_PROJECTIONS, BeamLoRAConfig
        from beamlora_ds.train.engine import initialize_engine

        a = self.args
        model = self.load()
        # apply() draws lora_A from the global RNG (as nn.Linear and peft do), whose state after loading a checkpoint
        # differs between launches: seeded here, every launch and mode starts from the same adapter
        self.torch.manual_seed(a.seed)
        beam = beamlora_ds.apply(model, BeamLoRAConfig(r=a.r, alpha=2.0 * a.r, dropout=0.0,
                                                       target_modules=list(LLAMA_PROJECTIONS), interval=a.interval,
                                                       p0=a.p0, total_steps=total_steps, seed=a.seed))
        splits = beamlora_ds.prepare_tensor_parallel(model, self.config)
        engine, config = initialize_engine(model, beam.modules, self.config, learning_rate=a.lr, weight_decay=0.0,
                                           lr_scheduler_type="constant", total_steps=total_steps, warmup_steps=0)
        self.final_configs["beamlora"] = config
        trainable = [p for p in model.parameters() if p.requires_grad]
        return engine, beam, {"trainable": f"{len(beam.modules)} BeamLoRA layers (A, B) + score",
                              "trainable_elements": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
                              "split_layers": len(splits)}


def layer_report(bench, engine, beam):
    """How the first q_proj's base and the output head came out: class and local weight shape (rank 0), and the
    q_proj rows each process holds (AutoTP splits attention by key-value heads: uneven when they do not divide)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    model = engine.module
    if beam is not None:
        q = next(m.base_layer for n, m in zip(beam.module_names, beam.modules) if n.endswith("q_proj"))
    else:
        q = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    head = model.get_output_embeddings()

    def describe(m):
        w = getattr(m, "weight", None)
        shape = list(getattr(w, "ds_shape", None) or (w.shape if w is not None else []))
        return {"class": f"{type(m).__module__}.{type(m).__name__}", "local_weight_shape": shape}

    rows = [None] * bench.world
    bench.dist.all_gather_object(rows, describe(q)["local_weight_shape"][:1])
    return {"q_proj_base": describe(q), "lm_head": describe(head), "q_proj_rows_per_process": [r[0] for r in rows],
            "column_parallel_layers": sum(isinstance(m, LinearLayer) for m in model.modules()),
            "row_parallel_layers": sum(isinstance(m, LinearAllreduce) for m in model.modules())}


def events_for(args):
    from beamlora_ds.method import algorithm

    return {kind: [t for t in range(1, args.steps + 1) if fn(t, args.interval, args.steps)]
            for kind, fn in (("snapshot", algorithm.is_snapshot_step), ("reset", algorithm.is_reset_step))}


def mean_over_processes(bench, values):
    """Per step: the loss of the whole global batch (the mean over data-parallel replicas; a TP group's
    processes hold the same loss, so the mean over all processes is it too)."""
    t = bench.torch.tensor(values, dtype=bench.torch.float64)
    bench.dist.all_reduce(t)
    return (t / bench.world).tolist()


def train(bench, runs, steps, label):
    """Round-robin over `runs` ({name: (engine, beam)}), one step each, the order rotated every step."""
    names = list(runs)
    batches = bench.global_batches(steps)
    series = {m: {} for m in names}
    resets = []
    for step in range(1, steps + 1):
        batch = bench.local_batch(batches[step - 1])
        k = step % len(names)
        for m in names[k:] + names[:k]:
            engine, beam = runs[m]
            times, record = train_step(bench, engine, beam, {key: v.to(engine.device) for key, v in batch.items()})
            for key, value in times.items():
                series[m].setdefault(key, []).append(value)
            if record is not None:
                resets.append({"engine": m, "step": record["step"], "keep_fraction": record["keep_fraction"],
                               "ranks_pruned": len(record["pruned"])})
        if step % max(1, steps // 5) == 0 or step == steps:
            say(bench.rank, f"{label}: step {step}/{steps} " + " ".join(
                f"{m} {series[m]['step_s'][-1]:.3f}s (loss on rank 0 {series[m]['loss'][-1]:.4f})" for m in names))
    for m in names:
        series[m]["loss_local"] = series[m].pop("loss")
        series[m]["loss"] = mean_over_processes(bench, series[m]["loss_local"])
    return series, resets


class CountCollectives:
    """While active: every torch.distributed collective this process calls (DeepSpeed's deepspeed.comm and
    beamlora_ds.backends.tensor_parallel both end there), by name: calls, elements, and the wall time of the
    synchronous ones (an async call's wait is not seen; on CPU gloo the wait is mostly the peer catching up)."""

    NAMES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all_single", "broadcast", "barrier")
    # DeepSpeed's torch backend keeps its own references to these two (ZeRO-3's parameter gathers and gradient
    # reduce-scatters go through them)
    BACKEND = {"all_gather_function": "all_gather_into_tensor", "reduce_scatter_function": "reduce_scatter_tensor"}

    def __init__(self):
        import torch.distributed as tdist
        from deepspeed.comm import comm as ds_comm

        self.tdist, self.backend, self.saved, self.saved_backend, self.stats = tdist, ds_comm.cdb, {}, {}, {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            entry = self.stats.setdefault(name, {"calls": 0, "async_calls": 0, "elements": 0, "sync_s": 0.0})
            entry["calls"] += 1
            tensor = next((t for t in (*args, *kwargs.values()) if hasattr(t, "numel")), None)
            entry["elements"] += tensor.numel() if tensor is not None else 0
            if kwargs.get("async_op"):
                entry["async_calls"] += 1
            else:
                entry["sync_s"] += time.perf_counter() - t0
            return out

        return counted

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(self.tdist, name):
                self.saved[name] = getattr(self.tdist, name)
                setattr(self.tdist, name, self._wrap(name, self.saved[name]))
        for attr, name in self.BACKEND.items():
            if getattr(self.backend, attr, None) is not None:
                self.saved_backend[attr] = getattr(self.backend, attr)
                setattr(self.backend, attr, self._wrap(name, self.saved_backend[attr]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.tdist, name, fn)
        for attr, fn in self.saved_backend.items():
            setattr(self.backend, attr, fn)


def count_collectives(bench, runs, steps):
    """Per engine, per step (rank 0): the collectives of `steps` more steps (after the timed ones, so the counting
    wrapper never touches the timing). The barriers of train_step are left out."""
    out = {}
    batches = bench.global_batches(steps)
    for m, (engine, beam) in runs.items():
        with CountCollectives() as counter:
            for ids in batches:
                batch = {k: v.to(engine.device) for k, v in bench.local_batch(ids).items()}
                train_step(bench, engine, beam, batch)
        stats = {k: {kk: vv / steps for kk, vv in v.items()} for k, v in counter.stats.items() if k != "barrier"}
        out[m] = stats
        ar = stats.get("all_reduce", {})
        say(bench.rank, f"collectives per step of {m} (rank 0): {ar.get('calls', 0):.0f} all-reduces "
            f"({ar.get('async_calls', 0):.0f} async, {ar.get('elements', 0) / 1e6:.2f} M elements, "
            f"{1000 * ar.get('sync_s', 0):.0f} ms in the synchronous ones); others: "
            + (", ".join(f"{k} {v['calls']:.0f}" for k, v in stats.items() if k != "all_reduce") or "none"))
    return out


def main():
    args = parse()
    bench = TPBench(args)
    label = "TP" if bench.tp > 1 else "ZeRO-3"
    say(bench.rank, f"{label}: set up ({bench.world} processes, tp {bench.tp}, {bench.replicas} data-parallel "
        f"replica(s), micro-batch {bench.micro} per process)")
    runs, info = {}, {}
    built = time.time()
    if args.task == "pair":
        for name, build in (("base", bench.build_base), ("beamlora", bench.build_beamlora)):
            engine, beam, info[name] = build(args.steps)
            info[name].update(layer_report(bench, engine, beam))
            runs[name] = (engine, beam)
            say(bench.rank, f"{label}: built {name}: q_proj base {info[name]['q_proj_base']['class']} "
                f"{info[name]['q_proj_base']['local_weight_shape']}, {info[name]['column_parallel_layers']} "
                f"column- / {info[name]['row_parallel_layers']} row-parallel layers, lm_head "
                f"{info[name]['lm_head']['class'].rsplit('.', 1)[-1]}")
    else:
        engine, beam, info["beamlora"] = bench.build_beamlora(args.steps)
        info["beamlora"].update(layer_report(bench, engine, beam))
        runs["beamlora"] = (engine, beam)
        say(bench.rank, f"{label}: built beamlora: q_proj base {info['beamlora']['q_proj_base']['class']}")
    build_s = time.time() - built
    series, resets = train(bench, runs, args.steps, label)
    collectives = count_collectives(bench, runs, args.comm_steps) if args.comm_steps else {}
    result = {"task": args.task, "mode": "tp" if bench.tp > 1 else "zero3", "world": bench.world, "tp": bench.tp,
              "replicas": bench.replicas, "micro_batch_per_process": bench.micro, "global_batch": args.global_batch,
              "seq_len": args.seq_len, "tokens_per_step": args.global_batch * args.seq_len,
              "threads_per_process": bench.threads, "model": bench.path, "model_name": bench.model_name,
              "r": args.r, "alpha": 2.0 * args.r, "lr": args.lr, "max_grad_norm": args.max_grad_norm,
              "steps": args.steps, "warmup": args.warmup, "interval": args.interval, "p0": args.p0,
              "events": events_for(args), "resets": resets, "engines": info, "build_s": build_s, "series": series,
              "comm_steps": args.comm_steps, "collectives_per_step_rank0": collectives,
              "ds_configs": bench.final_configs, "torch": bench.torch.__version__,
              "deepspeed": bench.deepspeed.__version__}
    if bench.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    bench.processes.release_shm_buffers(bench.dist)


if __name__ == "__main__":
    main()
