"""The shapes and byte counts behind launch/estimate_memory.py: parameter counts, NF4 storage, activations, and
what one process holds of each under tensor parallelism. Pure standard library.

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

Tensor parallelism (DeepSpeed AutoTP, docs/tensor_parallel.md): every count here takes `tp` and gives what ONE
process of a tensor-parallel group holds. local_shape() is the model as one process sees it: its attention heads
(ceil(heads / tp), ceil(kv_heads / tp): GQA-aware, the largest slice where the split is uneven) and its MLP
intermediate (ceil(i / tp)); hidden, vocab and layers unchanged. Its projection shapes are then exactly the local
(d_in, d_out): column-parallel q/k/v/gate/up keep d_in and split d_out, row-parallel o/down split d_in and keep
d_out. Applying the unsplit formulas to it gives
  base linear weights  each projection's slice;
  LoRA A and B         r x local d_in + local d_out x r: the split factor divided (B of a column-parallel module,
                       A of a row-parallel one), the other factor replicated (whole), as BeamLoRA splits them;
  score                r per module, replicated;
  activations          the split layers' tensors (q, k, v, attention output, o_proj input, SwiGLU operands,
                       down_proj input) at the local width; the hidden-size ones (RMSNorm inputs, q/k/v and gate/up
                       inputs, residual checkpoints, final norm) and the r-wide rank path replicated. The logits
                       are counted whole: AutoTP gathers an untied lm_head's output (conservative for a tied,
                       vocabulary-parallel one).
Embeddings follow AutoTP: a tied embedding/lm_head is split vocabulary-parallel (ceil(V / tp) rows); untied, the
lm_head is split column-parallel (ceil(V / tp) rows) and the input embedding stays whole. Norms and row-parallel
biases are replicated; column-parallel biases are split with their weight.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
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


def tp_problem(m: ModelShape, tp: int, gpus: int) -> Optional[str]:
    """Why `tp` cannot split `m` on `gpus` processes (the rules of docs/tensor_parallel.md), or None."""
    if tp < 1:
        return f"tp must be >= 1, not {tp}"
    if gpus % tp:
        return f"tp={tp} must divide gpus={gpus} (the data-parallel size is gpus / tp)"
    if tp > min(m.kv_heads, m.heads):
        return (f"tp={tp} exceeds {m.name}'s {m.kv_heads} key-value heads ({m.heads} attention heads); some "
                f"processes would hold empty attention slices: use tp <= {min(m.kv_heads, m.heads)}")
    return None


def local_shape(m: ModelShape, tp: int = 1) -> ModelShape:
    """The model as one process of a tensor-parallel group of `tp` sees it (the largest slice if uneven)."""
    if tp == 1:
        return m
    return replace(m, heads=math.ceil(m.heads / tp), kv_heads=math.ceil(m.kv_heads / tp),
                   intermediate=math.ceil(m.intermediate / tp), head_dim=m.hd)


def check_targets(targets: Iterable[str]) -> List[str]:
    targets = [t.strip() for t in targets if t.strip()]
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"unknown target module(s) {bad or targets}; choose from {', '.join(PROJECTIONS)}")
    return [p for p in PROJECTIONS if p in targets]


def base_param_counts(m: ModelShape, tp: int = 1) -> Dict[str, int]:
    """linear: decoder linear weights (what NF4 quantizes); other: embeddings, lm_head, norms, biases (bf16).
    Per process of a tensor-parallel group of `tp` (see the module docstring for what is split)."""
    loc = local_shape(m, tp)
    linear = m.layers * sum(i * o for i, o in projection_shapes(loc).values())
    biases = 0
    if m.attention_bias:
        biases += loc.q_dim + 2 * loc.kv_dim + m.hidden           # o_proj's bias is replicated
    if m.mlp_bias:
        biases += 2 * loc.intermediate + m.hidden                 # down_proj's bias is replicated
    head_rows = math.ceil(m.vocab / tp)                           # tied: vocab-parallel; untied: lm_head only
    embeddings = m.hidden * (head_rows if m.tie_word_embeddings else m.vocab + head_rows)
    other = embeddings + m.layers * (2 * m.hidden + biases) + m.hidden
    return {"linear": linear, "other": other, "total": linear + other}


def adapter_param_counts(m: ModelShape, r: int, targets: Sequence[str], tp: int = 1) -> Dict[str, int]:
    """lora: A (r x d_in) + B (d_out x r) of every targeted module; score: r per module (layer.py). Per process
    under tensor parallelism: the local d_in / d_out split one factor, the other stays whole (replicated)."""
    targets = check_targets(targets)
    for t in targets:
        if r > min(projection_shapes(m)[t]):
            raise ValueError(f"r={r} exceeds min(d_in, d_out)={min(projection_shapes(m)[t])} of {t}")
    proj = projection_shapes(local_shape(m, tp))
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
                               lora_dropout: float = 0.05, attention: str = "sdpa", tp: int = 1) -> int:
    """Bytes autograd keeps for one HF Llama decoder layer with BeamLoRA, bf16, no recomputation; under tensor
    parallelism one process's share (q, a, i below at their local width; h and r replicated).

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
    m = local_shape(m, tp)
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
                     attention: str = "sdpa", tp: int = 1) -> Dict[str, int]:
    """Peak activation bytes of one micro-batch (one process's share under tensor parallelism `tp`: only the
    recomputed layer's split tensors shrink; checkpoints, final norm and the gathered logits are replicated).

    layers: without checkpointing L x one layer; with it 2sbh x L (the bf16 layer inputs kept as checkpoints)
    + one layer's full activations while it is recomputed for its backward.
    final norm: 4sbh (fp32 input of the last RMSNorm; lm_head is frozen so its input is not kept).
    logits: 10 s b V: the bf16 logits the model returns (2) + the fp32 log-softmax cross-entropy keeps for
    backward (4) + one transient fp32 tensor of the same size (the .float() upcast in transformers'
    ForCausalLMLoss during forward, the logits' gradient during backward) (4). The brief's s*b*V*4 is one of them.
    We add the logits to the layer activations although they peak at slightly different moments: conservative.
    """
    one = activation_bytes_per_layer(m, seq, micro_batch, r, targets, lora_dropout, attention, tp)
    tokens = seq * micro_batch
    if gradient_checkpointing:
        layers = 2 * tokens * m.hidden * m.layers + one
    else:
        layers = m.layers * one
    return {"one_layer": one, "layers": layers, "final_norm": 4 * tokens * m.hidden,
            "logits": 10 * tokens * m.vocab,
            "korthikanti_one_layer": korthikanti_bytes_per_layer(m, seq, micro_batch)}


