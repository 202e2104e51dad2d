"""Which base model a run trained: recorded in every checkpoint's manifest, compared before a resume loads state.

Checkpoints hold no tensor of the frozen base (it is loaded again from its source), so a resume on another base
would go on training an adapter fitted to other weights, without an error. The record is the name or path the base
was loaded from and a fingerprint: a hash of the architecture (model type and sizes from the config, the 4-bit
settings, the number of parameters) and of values sampled at fixed flat positions from the input embedding and
from every one-dimensional frozen parameter (norms, biases). Those are never quantized, and the positions are read
wherever ZeRO-3 put them, so without tensor parallelism the fingerprint does not depend on the ZeRO stage or the
number of processes. Under tensor parallelism some of them may be slices (a vocabulary-parallel embedding, the bias
of a column-parallel layer) that differ between the processes of a group, so the fingerprint is process 0's,
agreed by every process: a resume compares it under the same tensor-parallel layout (another one is refused
before, by the controller's state). A base that differs only in its projection weights (another LoRA merged into
the same base) has the same fingerprint (the names, when they differ, are logged).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Dict, Optional

import torch

from ..backends import coordination
from ..backends.deepspeed.zero_params import is_zero3_param, values_held_at
from ..backends.wrappers import unwrap_model

logger = logging.getLogger(__name__)

EMBEDDING_SAMPLES = 256  # flat positions spread over the input embedding
NORM_SAMPLES = 8  # and over each one-dimensional frozen parameter
ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head")


def base_identity(model) -> dict:
    """{"name", "fingerprint"} of the frozen base under `model` (a model or an engine): process 0's, on every
    process. Call on every process (one gather of the result, one more of the sampled values under ZeRO-3)."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    sampled = _sampled_parameters(model)
    held: Dict[str, Dict[int, float]] = {name: values_held_at(param, positions)
                                         for name, (param, positions) in sampled.items()}
    if any(is_zero3_param(param) for param, _ in sampled.values()):  # ZeRO-3 shards: every process's values
        merged: Dict[str, Dict[int, float]] = {name: {} for name in sampled}
        for values in coordination.all_values(held):
            for name, found in values.items():
                merged[name].update(found)
        held = merged
    digest = hashlib.sha256(json.dumps(_architecture(model, config), sort_keys=True).encode())
    for name in sorted(held):
        digest.update(name.encode())
        values = torch.tensor([held[name][p] for p in sorted(held[name])], dtype=torch.float64)
        digest.update(values.to(torch.bfloat16).float().numpy().tobytes())  # a bf16 and an fp32 load agree
    mine = {"name": getattr(config, "name_or_path", None) or None, "fingerprint": digest.hexdigest()[:16]}
    return coordination.all_values(mine)[0]


def identity_problem(saved: Optional[dict], current: dict, tag: str) -> Optional[str]:
    """Why checkpoint `tag`, trained on the base `saved` records, must not be resumed on `current` (None: it may).
    A checkpoint that records no base (written with the base inside, or by an earlier beamlora_ds) is accepted."""
    if not saved or not saved.get("fingerprint"):
        return None
    if saved["fingerprint"] == current["fingerprint"]:
        if saved.get("name") != current.get("name") and coordination.is_process_zero():
            logger.info("Checkpoint %r was trained on %r, this run loaded %r: the same weights (fingerprint %s).",
                        tag, saved.get("name"), current.get("name"), current["fingerprint"])
        return None
    way = (f"load the base the run trained (launch/train.py: --model_name_or_path {saved['name']})"
           if saved.get("name") else "load the base the run trained (it recorded no name: a model built in code?)")
    return (f"Checkpoint {tag!r} was trained on the base {saved.get('name')!r} (fingerprint {saved['fingerprint']}), "
            f"but this run loaded {current.get('name')!r} (fingerprint {current['fingerprint']}): other weights. "
            f"Checkpoints hold the adapter, not the base; {way}, or start a new run in another output folder.")


def _sampled_parameters(model) -> Dict[str, tuple]:
    """name -> (frozen parameter, the flat positions to read): the input embedding and every 1-D frozen one."""
    chosen = {}
    embedding = getattr(model.get_input_embeddings(), "weight", None) if hasattr(model, "get_input_embeddings") \
        else None
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        if param is embedding:
            chosen[name] = (param, _spread(_full_numel(param), EMBEDDING_SAMPLES))
        elif len(shape) == 1:
            chosen[name] = (param, _spread(_full_numel(param), NORM_SAMPLES))
    return chosen


def _architecture(model, config) -> dict:
    """What the fingerprint hashes besides the values: the config's sizes, the 4-bit settings, the parameter count."""
    described = {key: getattr(config, key, None) for key in ARCHITECTURE if getattr(config, key, None) is not None}
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
        described["quantization"] = {k: str(quantization.get(k)) for k in ("load_in_4bit", "bnb_4bit_quant_type",
                                                                           "bnb_4bit_use_double_quant")}
    described["frozen_parameters"] = sum(1 for p in model.parameters() if not p.requires_grad)
    return described


def _full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _spread(numel: int, count: int) -> list:
    """`count` flat positions spread evenly over `numel` (all of them when fewer)."""
    return sorted({i * numel // count for i in range(min(count, numel))})
