"""A stock peft adapter from a BeamLoRA Megatron checkpoint folder, offline: no GPUs, no process group
(docs/megatron.md#export-to-a-peft-adapter-for-the-hugging-face-model).

`save_megatron_checkpoint` writes one file per process: its trainable tensors (its tensor-parallel slice, its pipeline
stage's modules), the fp32 main values of the part it owns (a flat shard under the DistributedOptimizer) and the
controller state (the whole-model module names, the tensor-parallel split). This reads every file, rebuilds each
parameter's fp32 main values from the data-parallel shards of its (tensor, pipeline) place, joins the
tensor-parallel slices, and writes what `save_megatron_adapter` writes from the live run.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, Optional, Tuple

import torch

from ..checkpointing.atomic import out_dir_problem
from ..method.score_table import TABLE_ATTRIBUTE
from .adapter_format import AdapterState, write_adapter
from .megatron import add_hf_projections

Place = Tuple[int, int]  # (tensor-parallel rank, pipeline rank)


def export_megatron_checkpoint(folder: str, out_dir: str, hf_config, base_model_name_or_path: Optional[str] = None,
                               overwrite: bool = False) -> str:
    """Write the adapter of the Megatron checkpoint `folder` as a stock peft adapter of the HF model `hf_config`
    describes (every pipeline stage's layers, tensor-parallel slices joined, the fp32 main values)."""
    problem = out_dir_problem(out_dir, overwrite)
    if problem:
        raise FileExistsError(problem)
    state = megatron_checkpoint_state(folder, hf_config)
    targets = sorted({hf.rpartition(".")[2] for hf in state.module_names})
    return write_adapter(state, out_dir, targets, "CAUSAL_LM",
                         base_model_name_or_path or getattr(hf_config, "name_or_path", None) or None, overwrite)


def megatron_checkpoint_state(folder: str, hf_config) -> AdapterState:
    """The unfolded adapter of a Megatron checkpoint under the HF model's module names."""
    files = sorted(glob.glob(os.path.join(folder, "rank*.pt")))
    if not files:
        raise FileNotFoundError(f"{folder!r} holds no rank*.pt: not a checkpoint save_megatron_checkpoint wrote.")
    saved = [torch.load(path, map_location="cpu", weights_only=False) for path in files]
    if any(s.get("format") != "beamlora_ds.megatron" for s in saved):
        raise ValueError(f"{folder!r} holds files that are not BeamLoRA Megatron checkpoint files.")
    values = gather_places(saved)
    config = saved[0]["beam"]["config"]
    state = AdapterState(r=int(config["r"]), alpha=float(config["alpha"]), tau=float(config["tau"]))
    tp = saved[0]["layout"]["tensor_parallel"]
    for name, (local, pp_rank) in module_places(saved).items():
        per_rank = [module_values(values[(t, pp_rank)], local) for t in range(tp)]
        split = saved_split(saved, name)
        a = torch.cat([v[0] for v in per_rank], dim=1) if split == "row" else per_rank[0][0]
        b_slices = [v[1] for v in per_rank] if split == "column" else [per_rank[0][1]]
        add_hf_projections(state, name, a, torch.cat(b_slices), b_slices, per_rank[0][2], hf_config)
    return state


def place_of(saved: dict) -> Place:
    return saved["layout"]["tensor_parallel_rank"], saved["layout"]["pipeline_parallel_rank"]


def gather_places(saved) -> Dict[Place, Dict[str, torch.Tensor]]:
    """Per (tensor, pipeline) place, every trainable parameter's whole fp32 main values."""
    places = sorted({place_of(s) for s in saved})
    return {place: fp32_parameters([s for s in saved if place_of(s) == place]) for place in places}


def fp32_parameters(replicas) -> Dict[str, torch.Tensor]:
    """The data-parallel replicas of one place: each owns a flat part [start, start + numel) of each parameter's
    fp32 main values (all of it under the plain optimizer); together they hold every value."""
    out = {}
    for name, param in replicas[0]["params"].items():
        flat, covered = torch.zeros(param.numel(), dtype=torch.float32), 0
        for replica in replicas:
            start, numel = replica["owned"].get(name, (0, 0))
            if numel:
                flat[start: start + numel] = replica["optimizer"][name]["param"].reshape(-1)[:numel].float()
                covered += numel
        if covered < param.numel():  # no optimizer part saved: the working copy
            flat = param.reshape(-1).float()
        out[name] = flat.view(param.shape)
    return out


def module_places(saved) -> Dict[str, Tuple[str, int]]:
    """{whole-model module name: (its local parameter prefix, pipeline rank)}: each file's controller state lists its
    modules by whole-model name, in the order of its parameters."""
    out = {}
    for s in saved:
        if s["layout"]["tensor_parallel_rank"] != 0:
            continue
        prefixes = [k[: -len(".lora_A")] for k in s["params"] if k.endswith(".lora_A")]
        for name, prefix in zip(s["beam"]["module_names"], prefixes):
            out.setdefault(name, (prefix, s["layout"]["pipeline_parallel_rank"]))
    return out


def module_values(values: Dict[str, torch.Tensor], prefix: str):
    """(A, B, score) of the module whose parameters start with `prefix` (its score: its row of its table)."""
    table_key = next(k for k in values if k.endswith(f"{TABLE_ATTRIBUTE}.lora_score")
                     and prefix.startswith(k[: -len(f"{TABLE_ATTRIBUTE}.lora_score")]))
    mine = [k[: -len(".lora_A")] for k in values if k.endswith(".lora_A")
            and k.startswith(table_key[: -len(f"{TABLE_ATTRIBUTE}.lora_score")])]
    return values[f"{prefix}.lora_A"], values[f"{prefix}.lora_B"], values[table_key][mine.index(prefix)]


def saved_split(saved, name: str) -> Optional[str]:
    """"column", "row" or None: how the tensor-parallel processes split `name` (the controller state's record)."""
    for s in saved:
        layout = s["beam"].get("tensor_parallel") or {}
        if name in layout:
            return layout[name][0]
    return None
