"""Per-GPU (and host) memory of BeamLoRA fine-tuning under DeepSpeed, computed from the model's shapes.

    python launch/estimate_memory.py --model 7b --gpus 8 --stage 3 --gradient_checkpointing
    python launch/estimate_memory.py --config path/to/config.json --gpus 1 --stage 2 --quantization nf4
    python launch/estimate_memory.py --model 70b --gpus 32 --tp 8 --stage 1 --gradient_checkpointing --micro_batch 1
    python launch/estimate_memory.py --table            # the table of the launch/ recipes (docs/recipes.md)
    python launch/estimate_memory.py --table --json out.json

Every component is a byte count from the shapes; the only allowances that are not computed are named as such
(the ZeRO-3 gather working set, the fixed CUDA/NCCL allowance). Pure standard library: no torch, no GPU. The shapes,
parameter counts, NF4 storage, activations and tensor-parallel slices are in launch/memory_model.py.

Components (bytes; P = base parameters, T = trainable adapter parameters = A + B + score, D = data-parallel size =
world size / tp; with --tp 1, D is the world size). Under tensor parallelism (--tp, DeepSpeed AutoTP,
docs/tensor_parallel.md) P and T are what one process holds (memory_model.py: the split layers' slices, the
replicated parts whole), and ZeRO partitions each process's slices over the D data-parallel replicas.
  base weights       bf16: 2 P.  NF4: see memory_model.py.  Whole on every GPU under ZeRO-1/2 and on a single
                     GPU (frozen weights are not partitioned below stage 3); divided by D under ZeRO-3; on the host
                     (divided by D per process) with ZeRO-3 param offload.
  adapter bf16 copy  2 T on every GPU. launch/train.py sets stage3_param_persistence_threshold above the largest
                     adapter tensor, so ZeRO-3 keeps A, B and the score whole and resident (also with offload).
  fp32 master + Adam 12 T / D (fp32 master 4 + exp_avg 4 + exp_avg_sq 4): ZeRO >= 1 partitions the optimizer;
                     on the host with optimizer offload.
  adapter gradients  ZeRO >= 2: 2 T / D (reduced bf16 gradient partition); ZeRO-1: 2 T (the bf16 gradients stay
                     whole, stage 1 does not partition them). Plus 4 T / D (fp32 copy of this rank's partition made
                     for the optimizer step). With optimizer offload the fp32 partition is on the host.
  BeamLoRA snapshot  host only: 3 x 4 bytes x (A + B) / D per process (fp32 rows/columns + both Adam moments of
                     this rank's shard; docs/architecture.md). The score is not snapshotted.
  activations        see activation_bytes_per_layer() in memory_model.py.
  ZeRO buffers       reduce buckets: reduce_bucket_size = h^2 elements ("auto" in beamlora_ds/train/ds_config_auto.py),
                     bf16; ZeRO-2 with overlap_comm allocates two of them (stage_1_and_2.py buf_0/buf_1),
                     ZeRO-1 (overlap_comm off: DeepSpeed's default below stage 3, ds_configs/tp8_zero1.json) and
                     ZeRO-3 one. ZeRO-3 gather working set (ASSUMPTION): two decoder layers of base weights in
                     their storage dtype (the layer being computed or recomputed for backward + the next one
                     prefetched). DeepSpeed's stage3_max_live_parameters (default 1e9 elements) may cap it lower
                     for 70B (one layer is 0.86e9 elements); we keep the conservative figure.
  4-bit dequant      NF4 only: bitsandbytes dequantizes one weight to bf16 for each matmul (forward and backward):
                     the largest linear weight x 2 bytes, transient.
  runtime allowance  CUDA context + NCCL communicators (ASSUMPTION, not computed; --overhead_gib, default 1.0).
                     Tensor parallelism's own all-reduces work in place on the layer outputs (not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # memory_model.py, also when loaded by path
from memory_model import (BUILTIN_MODELS, GIB, PROJECTIONS, ModelShape, activation_bytes,  # noqa: E402,F401
                          activation_bytes_per_layer, adapter_param_counts, base_param_counts, check_targets,
                          korthikanti_bytes_per_layer, local_shape, nf4_bytes, nf4_model_bytes, projection_shapes,
                          shape_from_config, tp_problem)


def refusal(model: ModelShape, gpus: int, stage: int, offload: bool, quantization: str, tp: int,
            lora_dropout: float) -> Optional[str]:
    """Why these settings cannot train (what beamlora_ds and launch/train.py refuse), or None."""
    if gpus < 1:
        return "gpus must be >= 1"
    if stage not in (1, 2, 3):
        return ("stage must be 1, 2 or 3 (bf16 under ZeRO-0 is refused by beamlora_ds; a single GPU uses stage 2, "
                "where nothing is partitioned)")
    if offload and stage != 3:
        return "--offload (parameters and optimizer on the CPU) needs ZeRO stage 3"
    if quantization not in ("none", "nf4"):
        return "quantization must be none or nf4"
    if tp != 1 and tp_problem(model, tp, gpus):
        return tp_problem(model, tp, gpus)
    if tp > 1 and quantization == "nf4":
        return "tensor parallelism cannot split a 4-bit base (a packed NF4 weight cannot be sliced): use bf16"
    if tp > 1 and lora_dropout > 0:
        return (f"tensor parallelism needs lora_dropout 0, not {lora_dropout} (launch/train.py defaults it to 0 "
                "under tensor parallelism)")
    return None


def _comp(name: str, gpu: float = 0.0, host: float = 0.0, note: str = "") -> dict:
    return {"name": name, "gpu_bytes": int(gpu), "host_bytes": int(host), "note": note}


def base_components(model: ModelShape, stage: int, offload: bool, quantization: str, double_quant: bool,
                    tp: int, dp: int) -> List[dict]:
    where = ("partitioned /%d (ZeRO-3)" % dp) if stage == 3 else "whole on every GPU"
    if tp > 1:
        where = f"{tp}-way TP slice, " + (where if stage == 3 else "not partitioned by ZeRO-%d" % stage)
    extra: List[dict] = []
    if quantization == "nf4":
        q = nf4_model_bytes(model, double_quant)
        name, stored = "base weights (NF4 + bf16 embed/norms)", q["packed"] + q["bf16_rest"]
        extra.append(_comp("NF4 quantization constants", q["constants"], 0, "absmax%s; not partitioned by ZeRO "
                           "(assumption)" % (" double-quantized" if double_quant else " fp32")))
    else:
        name, stored = "base weights (bf16)", 2 * base_param_counts(model, tp)["total"]
    if offload:
        return [_comp(name, 0, stored / dp, "on the host, /%d" % dp)] + extra
    return [_comp(name, stored / (dp if stage == 3 else 1), 0, where)] + extra


def adapter_components(adapter: dict, stage: int, offload: bool, tp: int, dp: int) -> List[dict]:
    T, lora = adapter["total"], adapter["lora"]
    opt = 12 * T / dp
    bf16_grads = 2 * T if stage == 1 else 2 * T / dp
    return [
        _comp("adapter working copy (bf16)", 2 * T, 0, "A+B+score whole on every GPU (persistence threshold)"
              if tp == 1 else "split factor /%d, other factor + score replicated" % tp),
        _comp("fp32 master + Adam moments", 0 if offload else opt, opt if offload else 0,
              ("on the host, " if offload else "") + "12 B/param /%d" % dp),
        _comp("adapter gradients", bf16_grads + (0 if offload else 4 * T / dp), 4 * T / dp if offload else 0,
              "bf16 %s + fp32 partition /%d%s" % ("whole (ZeRO-1)" if stage == 1 else "partition /%d" % dp, dp,
                                                 " (host)" if offload else "")),
        _comp("BeamLoRA snapshot", 0, 12 * lora / dp, "host: 3 x fp32 x (A+B) /%d" % dp),
    ]


def activation_components(act: dict, gradient_checkpointing: bool) -> List[dict]:
    return [_comp("activations: decoder layers", act["layers"], 0, "checkpoints 2sbhL + one layer recomputed"
                  if gradient_checkpointing else "L x one layer"),
            _comp("activations: final norm + logits", act["final_norm"] + act["logits"], 0, "4sbh + 10sbV")]


def buffer_components(model: ModelShape, stage: int, quantization: str, tp: int, overhead_gib: float) -> List[dict]:
    bucket = model.hidden * model.hidden * 2
    local = projection_shapes(local_shape(model, tp))
    if stage == 1:
        comps = [_comp("ZeRO reduce bucket", bucket, 0, "h^2 bf16 (overlap_comm off)")]
    elif stage == 2:
        comps = [_comp("ZeRO reduce buckets", 2 * bucket, 0, "2 x h^2 bf16 (overlap_comm)")]
    else:
        gather = 2 * sum(i * o for i, o in local.values()) * (0.5 if quantization == "nf4" else 2.0)
        comps = [_comp("ZeRO-3 reduce bucket + gathered layers", bucket + gather, 0,
                       "h^2 bf16 + 2 decoder layers of base weights (assumption)")]
    if quantization == "nf4":
        comps.append(_comp("4-bit dequantization buffer", 2 * max(i * o for i, o in local.values()), 0,
                           "largest linear weight in bf16, transient"))
    comps.append(_comp("CUDA context + NCCL (allowance)", overhead_gib * GIB, 0, "assumption, --overhead_gib"))
    return comps


@dataclass(frozen=True)
class Cluster:
    """Where one run trains: world size (GPUs), tensor-parallel degree, ZeRO stage, offload, and the GPU's memory."""

    gpus: int = 1
    stage: int = 3
    tp: int = 1
    offload: bool = False
    gpus_per_node: Optional[int] = None  # None: min(gpus, 8)
    gpu_mem_gib: float = 80.0
    overhead_gib: float = 1.0  # CUDA context + NCCL allowance (ASSUMPTION, not computed)

    @property
    def node_size(self) -> int:
        return self.gpus_per_node or min(self.gpus, 8)


@dataclass(frozen=True)
class Training:
    """What one run trains: the base's storage, the adapter, the batch and how activations are kept."""

    quantization: str = "none"
    double_quant: bool = True
    r: int = 64
    targets: Sequence[str] = PROJECTIONS
    micro_batch: int = 4
    seq: int = 512
    gradient_checkpointing: bool = True
    lora_dropout: Optional[float] = None  # None: the paper's 0.05, or 0 under tensor parallelism (as launch/train.py)
    attention: str = "sdpa"

    def dropout(self, tp: int) -> float:
        return (0.0 if tp > 1 else 0.05) if self.lora_dropout is None else self.lora_dropout


def estimate(model: ModelShape, cluster: Cluster = Cluster(), training: Training = Training()) -> dict:
    """Per-GPU and host memory of one training process. Returns components in bytes and totals."""
    dropout = training.dropout(cluster.tp)
    problem = refusal(model, cluster.gpus, cluster.stage, cluster.offload, training.quantization, cluster.tp, dropout)
    if problem:
        raise ValueError(problem)
    tp, dp = cluster.tp, cluster.gpus // cluster.tp
    targets = check_targets(training.targets)
    adapter = adapter_param_counts(model, training.r, targets, tp)
    act = activation_bytes(model, training.seq, training.micro_batch, training.r, targets,
                           training.gradient_checkpointing, dropout, training.attention, tp)
    base = base_components(model, cluster.stage, cluster.offload, training.quantization, training.double_quant, tp, dp)
    comps = (base
             + adapter_components(adapter, cluster.stage, cluster.offload, tp, dp)
             + activation_components(act, training.gradient_checkpointing)
             + buffer_components(model, cluster.stage, training.quantization, tp, cluster.overhead_gib))
    gpu_total = sum(c["gpu_bytes"] for c in comps)
    host_proc = sum(c["host_bytes"] for c in comps)
    inputs = dict(asdict(cluster), gpus_per_node=cluster.node_size, data_parallel=dp,
                  **dict(asdict(training), targets=list(targets), lora_dropout=dropout), model=asdict(model))
    return {
        "inputs": inputs,
        "params": {"base": base_param_counts(model), "adapter": adapter_param_counts(model, training.r, targets)},
        "params_per_gpu": {"base": base_param_counts(model, tp), "adapter": adapter},
        "activations": act,
        "components": comps,
        "gpu_total_bytes": gpu_total,
        "host_per_process_bytes": host_proc,
        "host_per_node_bytes": host_proc * min(cluster.node_size, cluster.gpus),
        "gpu_total_gib": gpu_total / GIB,
        "fits": gpu_total <= cluster.gpu_mem_gib * GIB,
    }


def format_report(res: dict) -> str:
    i = res["inputs"]
    p = res["params"]
    lines = [
        f"{i['model']['name']}: {p['base']['total']:,} base parameters; BeamLoRA r={i['r']} on "
        f"{','.join(i['targets'])}: {p['adapter']['lora']:,} A+B + {p['adapter']['score']:,} score "
        f"= {p['adapter']['total']:,} trainable ({p['adapter']['modules']} modules)",
        f"{i['gpus']} GPU(s), "
        f"{'TP=%d x %d data-parallel, ' % (i['tp'], i['data_parallel']) if i['tp'] > 1 else ''}"
        f"ZeRO-{i['stage']}{' + CPU offload' if i['offload'] else ''}, "
        f"base {'NF4' + (' (double quant)' if i['double_quant'] else '') if i['quantization'] == 'nf4' else 'bf16'}"
        f", micro-batch {i['micro_batch']} x {i['seq']} tokens, gradient checkpointing "
        f"{'on' if i['gradient_checkpointing'] else 'off'}, lora_dropout {i['lora_dropout']}, {i['attention']}",
        "",
        f"{'component':<44} {'GPU GiB':>9} {'host GiB':>9}  note",
        "-" * 100,
    ]
    for c in res["components"]:
        lines.append(f"{c['name']:<44} {c['gpu_bytes'] / GIB:>9.2f} {c['host_bytes'] / GIB:>9.2f}  {c['note']}")
    lines.append("-" * 100)
    verdict = "fits" if res["fits"] else "DOES NOT FIT"
    lines.append(f"{'total per GPU':<44} {res['gpu_total_gib']:>9.2f} {res['host_per_process_bytes'] / GIB:>9.2f}"
                 f"  {verdict} in {i['gpu_mem_gib']:g} GiB; host per node ({min(i['gpus_per_node'], i['gpus'])}"
                 f" processes): {res['host_per_node_bytes'] / GIB:.2f} GiB")
    a = res["activations"]
    lines.append(f"one decoder layer's activations: {a['one_layer'] / GIB:.3f} GiB (Korthikanti GPT formula "
                 f"sbh(34+5as/h), for reference: {a['korthikanti_one_layer'] / GIB:.3f} GiB)")
    return "\n".join(lines)


# The launch/ recipes. Table settings: micro-batch 4, 512 tokens, r 64, all 7 projections, checkpointing on.
RECIPES = [
    {"key": "single_gpu_qlora", "title": "single-GPU QLoRA", "script": "launch/single_gpu_qlora.sh",
     "config": "qlora_single.json", "gpus": 1, "gpus_per_node": 1, "stage": 2, "offload": False,
     "quantization": "nf4"},
    {"key": "node_zero2", "title": "8-GPU node, ZeRO-2 bf16", "script": "NUM_GPUS=8 DS_CONFIG=ds_configs/zero2.json launch/single_node.sh",
     "config": "zero2.json", "gpus": 8, "gpus_per_node": 8, "stage": 2, "offload": False, "quantization": "none"},
    {"key": "node_zero3", "title": "8-GPU node, ZeRO-3 bf16", "script": "launch/single_node.sh",
     "config": "zero3.json", "gpus": 8, "gpus_per_node": 8, "stage": 3, "offload": False, "quantization": "none"},
    {"key": "node_qlora_zero3", "title": "8-GPU node, QLoRA + ZeRO-3", "script": "DS_CONFIG=ds_configs/qlora_zero3.json QUANTIZATION=nf4 launch/single_node.sh",
     "config": "qlora_zero3.json", "gpus": 8, "gpus_per_node": 8, "stage": 3, "offload": False,
     "quantization": "nf4"},
    {"key": "node_tp8_zero1", "title": "8-GPU node, TP=8 x ZeRO-1 bf16", "script": "DS_CONFIG=ds_configs/tp8_zero1.json LORA_DROPOUT=0 GRAD_ACCUM=8 launch/single_node.sh",
     "config": "tp8_zero1.json", "gpus": 8, "gpus_per_node": 8, "stage": 1, "tp": 8, "offload": False,
     "quantization": "none"},
    {"key": "multi_node_zero3", "title": "4 nodes x 8 GPUs, ZeRO-3 bf16", "script": "launch/multi_node_70b.sh, launch/slurm_70b.sbatch",
     "config": "zero3.json", "gpus": 32, "gpus_per_node": 8, "stage": 3, "offload": False, "quantization": "none"},
    {"key": "multi_node_tp8_zero1", "title": "4 nodes x 8 GPUs, TP=8 in a node x ZeRO-1 across", "script": "DS_CONFIG=ds_configs/tp8_zero1.json LORA_DROPOUT=0 GRAD_ACCUM=8 launch/multi_node_70b.sh (or slurm_70b.sbatch)",
     "config": "tp8_zero1.json", "gpus": 32, "gpus_per_node": 8, "stage": 1, "tp": 8, "offload": False,
     "quantization": "none"},
    {"key": "multi_node_zero3_offload", "title": "4 nodes x 8 GPUs, ZeRO-3 + CPU offload", "script": "DS_CONFIG=ds_configs/zero3_offload.json launch/multi_node_70b.sh",
     "config": "zero3_offload.json", "gpus": 32, "gpus_per_node": 8, "stage": 3, "offload": True,
     "quantization": "none"},
]
TABLE_SETTINGS = dict(r=64, micro_batch=4, seq=512, gradient_checkpointing=True)


def recipe_results(**overrides) -> Dict[str, Dict[str, dict]]:
    training = Training(**dict(TABLE_SETTINGS, **overrides))
    out: Dict[str, Dict[str, dict]] = {}
    for rec in RECIPES:
        cluster = Cluster(gpus=rec["gpus"], gpus_per_node=rec["gpus_per_node"], stage=rec["stage"], tp=rec.get("tp", 1),
                          offload=rec["offload"])
        out[rec["key"]] = {key: estimate(shape, cluster, replace(training, quantization=rec["quantization"]))
                           for key, shape in BUILTIN_MODELS.items()}
    return out


def _cell(res: dict) -> str:
    gib = res["gpu_total_gib"]
    host = res["host_per_node_bytes"] / GIB
    limit = res["inputs"]["gpu_mem_gib"]
    text = f"{gib:.1f} (host {host:.1f})"
    if not res["fits"]:
        return f"**{gib:.1f}: does not fit 80 GB**" if limit == 80 else f"**{gib:.1f}: does not fit {limit:g} GiB**"
    if gib > 0.9 * limit:
        text += " tight"
    return text


def markdown_table(results: Optional[Dict[str, Dict[str, dict]]] = None) -> str:
    results = results or recipe_results()
    head = ("| recipe | GPUs | config | 7B | 13B | 70B |\n"
            "| --- | --- | --- | --- | --- | --- |")
    rows = []
    for rec in RECIPES:
        r = results[rec["key"]]
        nodes = rec["gpus"] // rec["gpus_per_node"]
        gpus = f"{rec['gpus']}" if nodes == 1 else f"{nodes} x {rec['gpus_per_node']}"
        rows.append(f"| {rec['title']} | {gpus} | `{rec['config']}` | {_cell(r['7b'])} | {_cell(r['13b'])} | "
                    f"{_cell(r['70b'])} |")
    s = TABLE_SETTINGS
    foot = (f"\nGiB per GPU (host GiB per node: BeamLoRA snapshot, plus offloaded weights and optimizer). "
            f"Micro-batch {s['micro_batch']} x {s['seq']} tokens, r = {s['r']} on all 7 projections, lora_dropout "
            f"0.05 (0 under TP), gradient checkpointing, bf16, NF4 with double quantization, 1 GiB CUDA/NCCL "
            f"allowance. "
            f"\"tight\": above 90% of 80 GiB. Computed by `python launch/estimate_memory.py --table`.")
    return "\n".join([head] + rows) + "\n" + foot


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=sorted(BUILTIN_MODELS), default="7b", help="built-in Llama-2 shapes")
    src.add_argument("--config", help="a Hugging Face config.json (Llama-style) instead of --model")
    p.add_argument("--gpus", type=int, default=1, help="total world size")
    p.add_argument("--gpus_per_node", type=int, default=None, help="for host memory per node (default min(gpus, 8))")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], default=3, help="ZeRO stage")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (DeepSpeed AutoTP autotp_size): "
                   "divides --gpus, at most the model's key-value heads; ZeRO partitions over gpus / tp")
    p.add_argument("--offload", action="store_true", help="ZeRO-3 with optimizer and parameters on the CPU")
    p.add_argument("--quantization", choices=["none", "nf4"], default="none")
    p.add_argument("--no_double_quant", action="store_true", help="NF4 without double quantization")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--targets", default=",".join(PROJECTIONS), help="comma list of projections")
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=None, help="default 0.05; 0 with --tp > 1 (required)")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--overhead_gib", type=float, default=1.0, help="CUDA context + NCCL allowance")
    p.add_argument("--gpu_mem_gib", type=float, default=80.0)
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--table", action="store_true", help="print the table of the launch/ recipes (docs/recipes.md)")
    args = p.parse_args(argv)
    if args.tp != 1 and not args.table:
        check_tp_args(p, args)
    return args


def check_tp_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse a --tp that the model, --gpus, --quantization or --lora_dropout cannot take (argparse error, exit 2)."""
    try:
        shape = shape_from_config(args.config) if args.config else BUILTIN_MODELS[args.model]
    except (ValueError, OSError) as e:
        p.error(str(e))
    dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
    problem = refusal(shape, args.gpus, args.stage, args.offload, args.quantization, args.tp, dropout)
    if problem:
        p.error(f"--tp {args.tp}: {problem}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.table:
            results = recipe_results()
            print(markdown_table(results))
            payload = {"settings": TABLE_SETTINGS, "recipes": RECIPES, "results": results}
        else:
            shape = shape_from_config(args.config) if args.config else BUILTIN_MODELS[args.model]
            cluster = Cluster(gpus=args.gpus, stage=args.stage, tp=args.tp, offload=args.offload,
                              gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                              overhead_gib=args.overhead_gib)
            training = Training(quantization=args.quantization, double_quant=not args.no_double_quant, r=args.r,
                                targets=args.targets.split(","), micro_batch=args.micro_batch, seq=args.seq,
                                gradient_checkpointing=args.gradient_checkpointing, lora_dropout=args.lora_dropout,
                                attention=args.attention)
            payload = estimate(shape, cluster, training)
            print(format_report(payload))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
