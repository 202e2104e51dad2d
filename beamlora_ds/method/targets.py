"""Recommended `target_modules` per architecture: every linear projection of a decoder layer, under the leaf names
transformers gives them (docs/architectures.md is written from this table; tests/test_conv1d.py checks each entry
against the installed transformers' own modules).

Keyed by `config.model_type`. Mixture-of-experts models are left out on purpose: their experts are 3-D
parameters, not layers BeamLoRA can wrap.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .config import LLAMA_PROJECTIONS

_GPT2 = ("c_attn", "c_proj", "c_fc")  # transformers Conv1D layers: weight stored in x out
_NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

RECOMMENDED_TARGETS: Dict[str, Tuple[str, ...]] = {
    **{model_type: LLAMA_PROJECTIONS for model_type in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "stablelm", "cohere", "granite",
        "smollm3")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,  # same names as GPT-2, but nn.Linear layers
    "gpt_neox": _NEOX,
    "falcon": _NEOX,
    "bloom": _NEOX,
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "codegen": ("qkv_proj", "out_proj", "fc_in", "fc_out"),
    "mpt": ("Wqkv", "out_proj", "up_proj", "down_proj"),
}


def recommended_targets(model_type: Optional[str]) -> Optional[Tuple[str, ...]]:
    """The target names for a `config.model_type`, or None when the architecture is not in the table."""
    return RECOMMENDED_TARGETS.get(model_type) if isinstance(model_type, str) else None


def model_type_of(model) -> Optional[str]:
    """`model.config.model_type` of a transformers model (None for other models)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None
