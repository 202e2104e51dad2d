"""A stock peft adapter for the Hugging Face model a megatron-core GPT came from (backends/megatron/hf_llama.py).

A fused Megatron layer is one BeamLoRA adapter: one A, one B over the fused output. Its peft equivalent is one
adapter per HF projection, each with the same (score-folded) A and its own rows of B: exact, because
B diag(w) A x stacked over the fused output is each projection's rows of B times the same diag(w) A x.
- `linear_qkv` -> q_proj, k_proj, v_proj: B's rows split per query group (Megatron interleaves q, k, v by group);
- `linear_fc1` -> gate_proj, up_proj: each tensor-parallel process holds [gate_k | up_k] of B's rows;
- `linear_proj` -> o_proj, `linear_fc2` -> down_proj: A's input columns gathered over the tensor-parallel group.
Values are the fp32 master: the working copy when it is fp32, else rebuilt from the optimizer's fragments.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..backends import coordination
from ..backends.megatron.access import MegatronAccess, pipeline_group
from ..backends.megatron.hf_llama import HF_NAMES, hf_module_names, split_fc1_rows, split_qkv_rows
from ..backends.tensor_parallel import gather_split
from ..backends.megatron.layers import megatron_beamlora_modules
from ..checkpointing.atomic import out_dir_problem
from .adapter_format import AdapterState, shared_settings, write_adapter
from .every_stage import every_stage


def save_megatron_adapter(model, out_dir: str, hf_config, optimizer=None, base_model_name_or_path: Optional[str] = None,
                          overwrite: bool = False) -> str:
    """Write the adapter of a BeamLoRA Megatron GPT as a stock peft adapter of the HF model `hf_config` describes.
    Collective: call it on every process (tensor-parallel slices are gathered, and pipeline stages' modules); process
    0 writes. `model`: the GPT (or Megatron's DDP around it), or this process's list of virtual pipeline chunks. Pass the Megatron
    `optimizer` when the model trains in bf16, so the fp32 master is exported rather than the bf16 working copy."""
    modules = megatron_beamlora_modules(model)
    if not modules:
        raise ValueError("This model has no BeamLoRA modules: pass the GPT model beamlora_ds.apply() wrapped.")
    writer = coordination.is_process_zero()
    problem = coordination.first_problem(out_dir_problem(out_dir, overwrite) if writer else None)
    if problem:
        raise FileExistsError(problem)
    state = every_stage(megatron_adapter_state(modules, hf_config, optimizer), pipeline_group())
    error = None
    if writer:
        try:
            targets = sorted({hf.rpartition(".")[2] for hf in state.module_names})
            write_adapter(state, out_dir, targets, "CAUSAL_LM",
                          base_model_name_or_path or getattr(hf_config, "name_or_path", None) or None, overwrite)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = f"{type(e).__name__}: {e}"
    error = coordination.first_problem(error)
    if error:
        raise RuntimeError(f"Process 0 could not write the adapter to {out_dir!r}: {error}")
    return out_dir


def megatron_adapter_state(modules: Dict[str, torch.nn.Module], hf_config, optimizer=None) -> AdapterState:
    """The unfolded adapter under the HF model's module names (collective over the tensor-parallel group)."""
    state = AdapterState(*shared_settings(modules))
    values = fp32_values(modules, optimizer)
    for name, m in modules.items():
        a, b, score = values[name]
        split = m.tensor_parallel
        slices = [b]
        if split is not None:
            whole = gather_split(a if split.split_factor == "lora_A" else b, split)
            if split.split_factor == "lora_A":
                a = whole
            else:
                b, slices = whole, list(whole.split(list(split.sizes)))
        add_hf_projections(state, name, a, b, slices, score, hf_config)
    return state


def add_hf_projections(state: AdapterState, name: str, a: torch.Tensor, b: torch.Tensor, b_slices,
                       score: torch.Tensor, hf_config) -> None:
    """One Megatron module's whole A and B (and B's rows per tensor-parallel process, which a fused fc1 needs) as
    the HF projections it fuses, each with the same A (module docstring)."""
    kind = name.rpartition(".")[2]
    parts = {"linear_qkv": lambda: split_qkv_rows(b, hf_config),
             "linear_fc1": lambda: split_fc1_rows(b_slices)}.get(kind, lambda: (b,))()
    hf_names = hf_module_names(name)
    if len(parts) != len(hf_names) or len(HF_NAMES[kind]) != len(hf_names):
        raise ValueError(f"{name}: {len(parts)} row blocks for {hf_names}")
    for hf_name, rows in zip(hf_names, parts):
        state.lora_A[hf_name], state.lora_B[hf_name] = a.clone(), rows.contiguous().clone()
        state.lora_score[hf_name] = score.clone()


def fp32_values(modules: Dict[str, torch.nn.Module], optimizer=None) -> Dict[str, tuple]:
    """(A, B, score) of each module in fp32, this process's tensor-parallel slices: the working copy when it is
    fp32 (it equals the master), else the master rebuilt from the optimizer's fragments (one all-reduce each)."""
    if optimizer is None or all(m.lora_A.dtype == torch.float32 for m in modules.values()):
        return {name: (m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu(),
                       m.lora_score.detach().float().cpu()) for name, m in modules.items()}
    access = MegatronAccess(list(modules.values()), optimizer)

    def whole(param, fragment):
        flat = torch.zeros(param.numel(), dtype=torch.float32)
        flat[fragment.start: fragment.start + fragment.numel] = fragment.read()
        return access.all_reduce(flat).view(param.shape)

    out, tables = {}, {}
    for (name, m), frags in zip(modules.items(), access.fragments):
        table = m.score_parameter
        if id(table) not in tables:  # the score table: rebuilt once for every module
            tables[id(table)] = whole(table, frags["lora_score"])
        score = tables[id(table)] if m.score_row is None else tables[id(table)][m.score_row].clone()
        out[name] = (whole(m.lora_A, frags["lora_A"]), whole(m.lora_B, frags["lora_B"]), score)
    return out
