"""Per-GPU (and host) memory of BeamLoRA fine-tuning under DeepSpeed, computed from the model's shapes.

    python launch/estimate_memory.py --model 7b --gpus 8 --stage 3 --gradient_checkpointing
    python launch/estimate_memory.py --config path/to/config.json --gpus 1 --stage 2 --quantization nf4
    python launch/estimate_memory.py --table            # the table of the launch/ recipes (docs/recipes.md)
    python launch/estimate_memory.py --table --json out.json

Every component is a byte count from the shapes; the only allowances that are not computed are named as such
(the ZeRO-3 gather working set, the fixed CUDA/NCCL allowance). Pure standard library: no torch, no GPU.

Components (bytes; P = base parameters, T = trainable adapter parameters = A + B + score, N = world size):
  base weights       bf16: 2 P.  NF4: see NF4 below.  Whole on every GPU under ZeRO-2 and on a single GPU;
                     divided by N under ZeRO-3; on the host (divided by N per process) with ZeRO-3 param offload.
  adapter bf16 copy  2 T on every GPU. launch/train.py sets stage3_param_persistence_threshold above the largest
                     adapter tensor, so ZeRO-3 keeps A, B and the score whole and resident (also with offload).
  fp32 master + Adam 12 T / N (fp32 master 4 + exp_avg 4 + exp_avg_sq 4): ZeRO >= 1 partitions the optimizer;
                     on the host with optimizer offload.
  adapter gradients  2 T / N (reduced bf16 gradient partition, ZeRO >= 2) + 4 T / N (fp32 copy of this rank's
                     partition made for the optimizer step). With optimizer offload the fp32 partition is on the host.
  BeamLoRA snapshot  host only: 3 x 4 bytes x (A + B) / N per process (fp32 rows/columns + both Adam moments of
                     this rank's shard; docs/architecture.md). The score is not snapshotted.
  activations        see activation_bytes_per_layer() below.
  ZeRO buffers       reduce buckets: reduce_bucket_size = h^2 elements ("auto" in beamlora_ds/ds_config.py),
                     bf16; ZeRO-2 with overlap_comm allocates two of them (stage_1_and_2.py buf_0/buf_1),
                     ZeRO-3 one. ZeRO-3 gather working set (ASSUMPTION): two decoder layers of base weights in
                     their storage dtype (the layer being computed or recomputed for backward + the next one
                     prefetched). DeepSpeed's stage3_max_live_parameters (default 1e9 elements) may cap it lower
                     for 70B (one layer is 0.86e9 elements); we keep the conservative figure.
  4-bit dequant      NF4 only: bitsandbytes dequantizes one weight to bf16 for each matmul (forward and backward):
                     the largest linear weight x 2 bytes, transient.
  runtime allowance  CUDA context + NCCL communicators (ASSUMPTION, not computed; --overhead_gib, default 1.0).

NF4 storage (bitsandbytes 0.50.2, bitsandbytes/functional.py quantize_4bit, read from the installed package;
QLoRA paper, Dettmers et al. 2023, arXiv:2305.14314, section 3 "Double Quantization"):
  * packed data: 4 bits = 0.5 byte per weight (uint8 pairs; bnb_4bit_quant_storage=bfloat16 only re-labels them);
  * blocksize 64 (default) with one fp32 absmax per block: 4/64 = 0.0625 byte/weight (= the paper's 0.5 bit);
  * with double quantization (compress_statistics / bnb_4bit_use_double_quant=True, the QLoRA recipe; HF's
    BitsAndBytesConfig defaults to False) the absmax are re-quantized to 8 bits in blocks of 256 with one fp32
    absmax per 256 blocks: 1/64 + 4/(64*256) byte/weight (= the paper's 8/64 + 32/(64*256) = 0.127 bit),
    plus a 256-entry fp32 code and an fp32 offset per tensor.
  So NF4 costs 0.5625 byte/weight without and 0.5159 byte/weight with double quantization (bf16: 2).
  Only the decoder's linear layers are quantized; embeddings, lm_head (transformers skips it) and norms stay bf16.
  Under ZeRO-3 DeepSpeed partitions the packed 4-bit tensor (docs/platform.md); the quantization constants live in
  bitsandbytes' quant_state, a plain attribute that ZeRO does not partition (ASSUMPTION, not verified on GPU), so
  we count them whole on every GPU.

Activations: the method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198, section 4.1): count the bytes of every tensor autograd saves for the backward pass.
Their GPT-layer result, sbh(34 + 5as/h) bytes per layer (s sequence, b micro-batch, h hidden, a heads; 16-bit
activations, 1-byte dropout masks), is printed as a reference (korthikanti_bytes_per_layer). We redo their count
for the HF Llama layer we actually train, because it differs in ways that matter (see activation_bytes_per_layer):
RMSNorm keeps an fp32 copy, SwiGLU instead of a 4h GeLU MLP, SDPA (no s^2 term), no hidden/attention dropout,
but every targeted BeamLoRA module keeps its own dropout output and mask, and its r-dim intermediates.
With full activation checkpointing (HF gradient_checkpointing, one checkpoint per decoder layer) the paper's
2sbh per layer is kept, plus one layer's full activations during its recomputation (their section 4.1 / 5).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence

GIB = float(1 << 30)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: Optional[int] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd


# From the published config.json of each model (hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, vocab_size).
BUILTIN_MODELS = {
    "7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000),
}


def shape_from_config(path: str) -> ModelShape:
    """Read a Hugging Face config.json of a Llama-style model (q/k/v/o + gate/up/down)."""
    with open(path) as f:
        cfg = json.load(f)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; expected a Llama-style HF config.json")
    return ModelShape(
        name=cfg.get("_name_or_path") or cfg.get("model_type", "config"),
        hidden=int(cfg["hidden_size"]), intermediate=int(cfg["intermediate_size"]),
        layers=int(cfg["num_hidden_layers"]), heads=int(cfg["num_attention_heads"]),
        kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        vocab=int(cfg["vocab_size"]), head_dim=cfg.get("head_dim"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))


def projection_shapes(m: ModelShape) -> Dict[str, tuple]:
    """(d_in, d_out) of each linear projection of one decoder layer."""
    return {"q_proj": (m.hidden, m.q_dim), "k_proj": (m.hidden, m.kv_dim), "v_proj": (m.hidden, m.kv_dim),
            "o_proj": (m.q_dim, m.hidden), "gate_proj": (m.hidden, m.intermediate),
            "up_proj": (m.hidden, m.intermediate), "down_proj": (m.intermediate, m.hidden)}


def check_targets(targets: Iterable[str]) -> List[str]:
    targets = [t.strip() for t in targets if t.strip()]
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"unknown target module(s) {bad or targets}; choose from {', '.join(PROJECTIONS)}")
    return [p for p in PROJECTIONS if p in targets]


def base_param_counts(m: ModelShape) -> Dict[str, int]:
    """linear: decoder linear weights (what NF4 quantizes); other: embeddings, lm_head, norms, biases (bf16)."""
    proj = projection_shapes(m)
    linear = m.layers * sum(i * o for i, o in proj.values())
    biases = 0
    if m.attention_bias:
        biases += m.q_dim + 2 * m.kv_dim + m.hidden
    if m.mlp_bias:
        biases += 2 * m.intermediate + m.hidden
    other = m.vocab * m.hidden * (1 if m.tie_word_embeddings else 2) + m.layers * (2 * m.hidden + biases) + m.hidden
    return {"linear": linear, "other": other, "total": linear + other}


def adapter_param_counts(m: ModelShape, r: int, targets: Sequence[str]) -> Dict[str, int]:
    """lora: A (r x d_in) + B (d_out x r) of every targeted module; score: r per module (layer.py)."""
    proj = projection_shapes(m)
    targets = check_targets(targets)
    for t in targets:
        if r > min(proj[t]):
            raise ValueError(f"r={r} exceeds min(d_in, d_out)={min(proj[t])} of {t}")
    lora = m.layers * sum(r * (proj[t][0] + proj[t][1]) for t in targets)
    score = m.layers * len(targets) * r
    largest = max(r * max(proj[t]) for t in targets)
    return {"lora": lora, "score": score, "total": lora + score, "modules": m.layers * len(targets),
            "largest_tensor": largest}


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> Dict[str, int]:
    """Bytes of one weight tensor quantized by bitsandbytes quantize_4bit (see the module docstring)."""
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        constants = blocks * 1 + math.ceil(blocks / 256) * 4 + 256 * 4 + 4  # uint8 absmax, fp32 absmax2, code, offset
    else:
        constants = blocks * 4                                                 # fp32 absmax
    return {"packed": packed, "constants": constants}


def nf4_model_bytes(m: ModelShape, double_quant: bool = True) -> Dict[str, int]:
    packed = constants = 0
    for d_in, d_out in projection_shapes(m).values():
        b = nf4_bytes(d_in * d_out, double_quant)
        packed += m.layers * b["packed"]
        constants += m.layers * b["constants"]
    return {"packed": packed, "constants": constants, "bf16_rest": 2 * base_param_counts(m)["other"]}


def korthikanti_bytes_per_layer(m: ModelShape, seq: int, micro_batch: int) -> int:
    """sbh(34 + 5as/h): Korthikanti et al. 2022, eq. (1), GPT layer, no parallelism, no recomputation."""
    s, b, h, a = seq, micro_batch, m.hidden, m.heads
    return 34 * s * b * h + 5 * a * s * s * b


def activation_bytes_per_layer(m: ModelShape, seq: int, micro_batch: int, r: int, targets: Sequence[str],
                               lora_dropout: float = 0.05, attention: str = "sdpa") -> int:
    """Bytes autograd keeps for one HF Llama decoder layer with BeamLoRA, bf16, no recomputation.

    Counted per token (then x s x b), following Korthikanti et al.'s method; h hidden, i intermediate,
    q = heads x head_dim, a heads. A frozen linear does not keep its input (only its weight is needed for the
    input gradient); a BeamLoRA module does (lora_A's gradient needs it).
      RMSNorm x 2          4h each: transformers' LlamaRMSNorm upcasts to fp32 and the fp32 input is saved
      q/k/v input          2h if any of q/k/v is targeted (one shared tensor)
      q after RoPE         2q, saved by attention
      k, v                 2q each: transformers calls repeat_kv (expanding GQA's kv heads to all heads) whenever
                           an attention mask is passed (sdpa_attention.py use_gqa_in_sdpa), as with padded
                           batches; so GQA saves no activation memory here and we count full width
      attention            sdpa: output 2q + fp32 logsumexp 4a (flash / memory-efficient kernels keep no s x s)
                           eager: fp32 softmax output 4as + bf16 probabilities 2as (no attention dropout: Llama's
                           attention_dropout is 0), and the output is not saved
      o_proj input         2q if o_proj is targeted (the transposed .contiguous() copy)
      gate/up input        2h if gate or up is targeted
      SwiGLU               2i (gate output, saved by SiLU) + 2i (SiLU output) + 2i (up output), the two operands
                           of the product; a GeLU MLP of width 4h would be Korthikanti's 18h
      down_proj input      2i if down_proj is targeted (the product)
      BeamLoRA dropout     p > 0: each targeted module applies its own nn.Dropout, keeping a bf16 output (2 d_in)
                           and a bool mask (1 d_in): 3 d_in per module. p = 0: nn.Identity, nothing
      BeamLoRA rank path   A x and w * (A x): 2 x 2r per module
    """
    targets = check_targets(targets)
    proj = projection_shapes(m)
    h, i, q, a = m.hidden, m.intermediate, m.q_dim, m.heads
    t = set(targets)
    per_token = 2 * 4 * h
    if t & {"q_proj", "k_proj", "v_proj"}:
        per_token += 2 * h
    per_token += 2 * q + 2 * 2 * q
    if attention == "sdpa":
        per_token += 2 * q + 4 * a
    elif attention == "eager":
        per_token += (4 + 2) * a * seq
    else:
        raise ValueError(f"attention must be sdpa or eager, not {attention!r}")
    if "o_proj" in t:
        per_token += 2 * q
    if t & {"gate_proj", "up_proj"}:
        per_token += 2 * h
    per_token += 3 * 2 * i
    if "down_proj" in t:
        per_token += 2 * i
    for name in targets:
        if lora_dropout > 0:
            per_token += 3 * proj[name][0]
        per_token += 2 * 2 * r
    return per_token * seq * micro_batch


def activation_bytes(m: ModelShape, seq: int, micro_batch: int, r: int, targets: Sequence[str],
                     gradient_checkpointing: bool, lora_dropout: float = 0.05,
                     attention: str = "sdpa") -> Dict[str, int]:
    """Peak activation bytes of one micro-batch.

    layers: without checkpointing L x one layer; with it 2sbh x L (the bf16 layer inputs kept as checkpoints)
    + one layer's full activations while it is recomputed for its backward.
    final norm: 4sbh (fp32 input of the last RMSNorm; lm_head is frozen so its input is not kept).
    logits: 10 s b V: the bf16 logits the model returns (2) + the fp32 log-softmax cross-entropy keeps for
    backward (4) + one transient fp32 tensor of the same size (the .float() upcast in transformers'
    ForCausalLMLoss during forward, the logits' gradient during backward) (4). The brief's s*b*V*4 is one of them.
    We add the logits to the layer activations although they peak at slightly different moments: conservative.
    """
    one = activation_bytes_per_layer(m, seq, micro_batch, r, targets, lora_dropout, attention)
    tokens = seq * micro_batch
    if gradient_checkpointing:
        layers = 2 * tokens * m.hidden * m.layers + one
    else:
        layers = m.layers * one
    return {"one_layer": one, "layers": layers, "final_norm": 4 * tokens * m.hidden,
            "logits": 10 * tokens * m.vocab,
            "korthikanti_one_layer": korthikanti_bytes_per_layer(m, seq, micro_batch)}


def estimate(model: ModelShape, gpus: int = 1, stage: int = 3, offload: bool = False, quantization: str = "none",
             r: int = 64, targets: Sequence[str] = PROJECTIONS, micro_batch: int = 4, seq: int = 512,
             gradient_checkpointing: bool = True, gpus_per_node: Optional[int] = None, lora_dropout: float = 0.05,
             attention: str = "sdpa", double_quant: bool = True, overhead_gib: float = 1.0,
             gpu_mem_gib: float = 80.0) -> dict:
    """Per-GPU and host memory of one training process. Returns components in bytes and totals."""
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    if stage not in (2, 3):
        raise ValueError("stage must be 2 or 3 (bf16 under ZeRO-0 is refused by beamlora_ds; a single GPU uses "
                         "stage 2, where nothing is partitioned)")
    if offload and stage != 3:
        raise ValueError("--offload (parameters and optimizer on the CPU) needs ZeRO stage 3")
    if quantization not in ("none", "nf4"):
        raise ValueError("quantization must be none or nf4")
    gpus_per_node = gpus_per_node or min(gpus, 8)
    n = gpus
    targets = check_targets(targets)
    base = base_param_counts(model)
    adapter = adapter_param_counts(model, r, targets)
    T, lora = adapter["total"], adapter["lora"]
    proj = projection_shapes(model)
    layer_params = sum(i * o for i, o in proj.values())
    comps: List[dict] = []

    def add(name, gpu=0.0, host=0.0, note=""):
        comps.append({"name": name, "gpu_bytes": int(gpu), "host_bytes": int(host), "note": note})

    # Base weights.
    if quantization == "nf4":
        q = nf4_model_bytes(model, double_quant)
        stored = q["packed"] + q["bf16_rest"]
        where = ("partitioned /%d (ZeRO-3)" % n) if stage == 3 else "whole on every GPU"
        if offload:
            add("base weights (NF4 + bf16 embed/norms)", 0, stored / n, "on the host, /%d" % n)
        else:
            add("base weights (NF4 + bf16 embed/norms)", stored / (n if stage == 3 else 1), 0, where)
        add("NF4 quantization constants", q["constants"], 0,
            "absmax%s; not partitioned by ZeRO (assumption)" % (" double-quantized" if double_quant else " fp32"))
        storage_per_param = 0.5
    else:
        stored = 2 * base["total"]
        if offload:
            add("base weights (bf16)", 0, stored / n, "on the host, /%d" % n)
        else:
            add("base weights (bf16)", stored / (n if stage == 3 else 1), 0,
                ("partitioned /%d (ZeRO-3)" % n) if stage == 3 else "whole on every GPU")
        storage_per_param = 2.0

    add("adapter working copy (bf16)", 2 * T, 0, "A+B+score whole on every GPU (persistence threshold)")
    opt = 12 * T / n
    add("fp32 master + Adam moments", 0 if offload else opt, opt if offload else 0,
        ("on the host, " if offload else "") + "12 B/param /%d" % n)
    add("adapter gradients", 2 * T / n + (0 if offload else 4 * T / n), 4 * T / n if offload else 0,
        "bf16 partition%s + fp32 partition%s" % ((" /%d" % n), " (host)" if offload else ""))
    add("BeamLoRA snapshot", 0, 12 * lora / n, "host: 3 x fp32 x (A+B) /%d" % n)

    act = activation_bytes(model, seq, micro_batch, r, targets, gradient_checkpointing, lora_dropout, attention)
    add("activations: decoder layers", act["layers"], 0,
        ("checkpoints 2sbhL + one layer recomputed" if gradient_checkpointing else "L x one layer"))
    add("activations: final norm + logits", act["final_norm"] + act["logits"], 0, "4sbh + 10sbV")

    bucket = model.hidden * model.hidden * 2
    if stage == 2:
        add("ZeRO reduce buckets", 2 * bucket, 0, "2 x h^2 bf16 (overlap_comm)")
    else:
        gather = 2 * layer_params * storage_per_param
        add("ZeRO-3 reduce bucket + gathered layers", bucket + gather, 0,
            "h^2 bf16 + 2 decoder layers of base weights (assumption)")
    if quantization == "nf4":
        add("4-bit dequantization buffer", 2 * max(i * o for i, o in proj.values()), 0,
            "largest linear weight in bf16, transient")
    add("CUDA context + NCCL (allowance)", overhead_gib * GIB, 0, "assumption, --overhead_gib")

    gpu_total = sum(c["gpu_bytes"] for c in comps)
    host_proc = sum(c["host_bytes"] for c in comps)
    return {
        "inputs": {"model": asdict(model), "gpus": gpus, "gpus_per_node": gpus_per_node, "stage": stage,
                   "offload": offload, "quantization": quantization, "double_quant": double_quant, "r": r,
                   "targets": list(targets), "micro_batch": micro_batch, "seq": seq,
                   "gradient_checkpointing": gradient_checkpointing, "lora_dropout": lora_dropout,
                   "attention": attention, "overhead_gib": overhead_gib, "gpu_mem_gib": gpu_mem_gib},
        "params": {"base": base, "adapter": adapter},
        "activations": act,
        "components": comps,
        "gpu_total_bytes": gpu_total,
        "host_per_process_bytes": host_proc,
        "host_per_node_bytes": host_proc * min(gpus_per_node, gpus),
        "gpu_total_gib": gpu_total / GIB,
        "fits": gpu_total <= gpu_mem_gib * GIB,
    }


def format_report(res: dict) -> str:
    i = res["inputs"]
    p = res["params"]
    lines = [
        f"{i['model']['name']}: {p['base']['total']:,} base parameters; BeamLoRA r={i['r']} on "
        f"{','.join(i['targets'])}: {p['adapter']['lora']:,} A+B + {p['adapter']['score']:,} score "
        f"= {p['adapter']['total']:,} trainable ({p['adapter']['modules']} modules)",
        f"{i['gpus']} GPU(s), ZeRO-{i['stage']}{' + CPU offload' if i['offload'] else ''}, "
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
    {"key": "multi_node_zero3", "title": "4 nodes x 8 GPUs, ZeRO-3 bf16", "script": "launch/multi_node_70b.sh, launch/slurm_70b.sbatch",
     "config": "zero3.json", "gpus": 32, "gpus_per_node": 8, "stage": 3, "offload": False, "quantization": "none"},
    {"key": "multi_node_zero3_offload", "title": "4 nodes x 8 GPUs, ZeRO-3 + CPU offload", "script": "DS_CONFIG=ds_configs/zero3_offload.json launch/multi_node_70b.sh",
     "config": "zero3_offload.json", "gpus": 32, "gpus_per_node": 8, "stage": 3, "offload": True,
     "quantization": "none"},
]
TABLE_SETTINGS = dict(r=64, micro_batch=4, seq=512, gradient_checkpointing=True)


def recipe_results(**overrides) -> Dict[str, Dict[str, dict]]:
    settings = dict(TABLE_SETTINGS, **overrides)
    out: Dict[str, Dict[str, dict]] = {}
    for rec in RECIPES:
        out[rec["key"]] = {}
        for key, shape in BUILTIN_MODELS.items():
            out[rec["key"]][key] = estimate(shape, gpus=rec["gpus"], gpus_per_node=rec["gpus_per_node"],
                                            stage=rec["stage"], offload=rec["offload"],
                                            quantization=rec["quantization"], **settings)
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
            f"0.05, gradient checkpointing, bf16, NF4 with double quantization, 1 GiB CUDA/NCCL allowance. "
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
    p.add_argument("--stage", type=int, choices=[2, 3], default=3, help="ZeRO stage")
    p.add_argument("--offload", action="store_true", help="ZeRO-3 with optimizer and parameters on the CPU")
    p.add_argument("--quantization", choices=["none", "nf4"], default="none")
    p.add_argument("--no_double_quant", action="store_true", help="NF4 without double quantization")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--targets", default=",".join(PROJECTIONS), help="comma list of projections")
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--overhead_gib", type=float, default=1.0, help="CUDA context + NCCL allowance")
    p.add_argument("--gpu_mem_gib", type=float, default=80.0)
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--table", action="store_true", help="print the table of the launch/ recipes (docs/recipes.md)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.table:
            results = recipe_results()
            print(markdown_table(results))
            payload = {"settings": TABLE_SETTINGS, "recipes": RECIPES, "results": results}
        else:
            shape = shape_from_config(args.config) if args.config else BUILTIN_MODELS[args.model]
            payload = estimate(shape, gpus=args.gpus, stage=args.stage, offload=args.offload,
                               quantization=args.quantization, r=args.r, targets=args.targets.split(","),
                               micro_batch=args.micro_batch, seq=args.seq,
                               gradient_checkpointing=args.gradient_checkpointing,
                               gpus_per_node=args.gpus_per_node, lora_dropout=args.lora_dropout,
                               attention=args.attention, double_quant=not args.no_double_quant,
                               overhead_gib=args.overhead_gib, gpu_mem_gib=args.gpu_mem_gib)
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
