"""A peft adapter (or a merged model) from a DeepSpeed checkpoint folder, offline: no GPUs, no distributed job.

A training job that died, or ran on a cluster, leaves checkpoints; this turns one into the same files
save_adapter writes (docs/method.md section 6). The fp32 master is rebuilt from any ZeRO stage's files with
DeepSpeed's own zero_to_fp32; r, alpha, tau and the module names come from the controller state that
beamlora_ds.save_checkpoint wrote beside them. Whether the wrapped layers were transformers Conv1D (peft's
fan_in_fan_out) is not in the checkpoint: it is read from the base model's architecture when the base is known.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from ..checkpointing.atomic import out_dir_problem
from ..checkpointing.layout import STATE_FILE
from ..loading.models import meta_skeleton
from ..method.controller import STATE_VERSION
from ..method.layer import is_conv1d_layout
from ..method.score_table import TABLE_ATTRIBUTE
from ..method.stages import layer_number
from .adapter_format import AdapterState, fan_in_fan_out_of, target_modules_from_config, write_adapter
from .every_stage import renamed
from .from_trainer import adapter_state_from_folder, trainer_adapter_folder
from .merge import merge_state_into, save_merged

logger = logging.getLogger(__name__)

CONTROLLER_STATE_FILE = STATE_FILE.format(rank=0)  # written by beamlora_ds.save_checkpoint in the tag folder


def resolve_tag(checkpoint_dir: str, tag: Optional[str]) -> str:
    """`tag`, else the one named in the checkpoint folder's `latest` file."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"Checkpoint folder {checkpoint_dir!r} does not exist.")
    if tag:
        return tag
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        tags = sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d)))
        raise FileNotFoundError(f"{checkpoint_dir!r} has no 'latest' file; pass --tag, one of {tags[:5]}.")
    with open(latest) as f:
        return f.read().strip()


def controller_state(tag_dir: str) -> dict:
    """The BeamController.state_dict() saved by beamlora_ds.save_checkpoint (r, alpha, tau, module names)."""
    path = os.path.join(tag_dir, CONTROLLER_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by beamlora_ds.save_checkpoint, "
                                "so tau and the module names are unknown. Save checkpoints with "
                                "beamlora_ds.save_checkpoint(engine, beam, dir).")
    state = torch.load(path, map_location="cpu", weights_only=False).get("beamlora", {})
    if "config" not in state or "module_names" not in state:
        raise ValueError(f"{path} does not hold a BeamController state (no 'config'/'module_names').")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} holds a BeamLoRA state of version {state.get('version')!r}; this beamlora_ds reads "
                         f"version {STATE_VERSION} (an earlier development version of beamlora_ds wrote it). Export "
                         "it with the beamlora_ds that wrote it.")
    return state


def fp32_weights_from_checkpoint(tag_dir: str, checkpoint_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """Trainable weights as full fp32 tensors (lazily, not materialised), from any ZeRO stage's files."""
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1-3: rebuild the fp32 master
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag, exclude_frozen_parameters=True,
                                                        lazy_mode=True)
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")  # ZeRO-0: the whole module is in the model file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir!r} holds neither ZeRO optimizer shards nor mp_rank_00_model_states.pt: "
                                "not a DeepSpeed checkpoint folder.")
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    low = sorted({str(t.dtype) for k, t in module.items() if "lora_" in k and t.dtype != torch.float32})
    if low:
        logger.warning("ZeRO stage 0 checkpoint stores the adapter in %s; exporting that precision.", low)
    return module


def _slices(layout: dict) -> int:
    return len(next(iter(layout.values()))[1])


def fp32_weights_of_slice(tag_dir: str, tp_rank: int) -> Dict[str, torch.Tensor]:
    """The fp32 weights of one tensor-parallel slice of a checkpoint: DeepSpeed writes each slice's model and
    optimizer files with `mp_rank_XX` in the name, which zero_to_fp32 does not tell apart; so the slice's files
    are linked into a scratch folder under the names of a checkpoint without tensor parallelism, and read there."""
    import tempfile

    mine = f"mp_rank_{tp_rank:02d}"
    files = [f for f in os.listdir(tag_dir) if mine in f]
    if not files:
        raise FileNotFoundError(f"{tag_dir!r} has no files of tensor-parallel slice {tp_rank} ({mine}_*).")
    with tempfile.TemporaryDirectory() as scratch:
        os.makedirs(os.path.join(scratch, "slice"))
        for name in files:
            os.symlink(os.path.join(os.path.abspath(tag_dir), name),
                       os.path.join(scratch, "slice", name.replace(mine, "mp_rank_00")))
        weights = fp32_weights_from_checkpoint(os.path.join(scratch, "slice"), scratch, "slice")
        return {key: _materialise(value).clone() for key, value in weights.items() if "lora_" in key}


def consolidate_slices(layout: dict, slices) -> Dict[str, torch.Tensor]:
    """One weight dict for the unsplit model: each split factor (B of a column layer, A of a row layer; `layout`
    from the controller state) concatenated over the slices in order, everything else from slice 0."""
    whole = dict(slices[0])
    for name, (kind, sizes) in layout.items():
        key, dim = (f"{name}.lora_B", 0) if kind == "column" else (f"{name}.lora_A", 1)
        parts = [_lookup(weights, key) for weights in slices]
        if any(part is None for part in parts):
            continue  # reported as missing by the caller
        if [part.shape[dim] for part in parts] != list(sizes):
            raise ValueError(f"{key}: the slices hold {[tuple(p.shape) for p in parts]}, the controller state says "
                             f"{kind}-parallel sizes {sizes}. The checkpoint is inconsistent; nothing was written.")
        whole[next(k for k in (key, "module." + key) if k in slices[0])] = torch.cat(parts, dim=dim)
    return whole


def adapter_state_from_checkpoint(checkpoint_dir: str, tag: Optional[str] = None) -> Tuple[AdapterState, dict]:
    """The unfolded adapter and the BeamLoRA config of a DeepSpeed checkpoint; no distributed job needed."""
    tag = resolve_tag(checkpoint_dir, tag)
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"No checkpoint {tag!r} in {checkpoint_dir!r}.")
    ctrl = controller_state(tag_dir)
    config = ctrl["config"]
    layout = ctrl.get("tensor_parallel") or {}
    if glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")):  # a PipelineEngine's: one file per layer
        weights, names, scores = pipeline_weights(tag_dir)
        ctrl = dict(ctrl, module_names=names, scores=scores)
    elif layout:  # one set of files per tensor-parallel slice: rebuild each, then put the split factors together
        weights = consolidate_slices(layout, [fp32_weights_of_slice(tag_dir, t) for t in range(_slices(layout))])
    else:
        weights = fp32_weights_from_checkpoint(tag_dir, checkpoint_dir, tag)
    state = AdapterState(r=int(config["r"]), alpha=float(config["alpha"]), tau=float(config["tau"]),
                         dropout=float(config.get("dropout", 0.0)))
    missing = []
    table = _lookup(weights, f"{TABLE_ATTRIBUTE}.lora_score")  # every module's scores, one row each
    table = _materialise(table) if table is not None else None
    if (table is None or table.shape[0] != len(ctrl["module_names"])) and "scores" not in ctrl:
        missing.append(f"{TABLE_ATTRIBUTE}.lora_score")
    for index, name in enumerate(ctrl["module_names"]):
        for key in ("lora_A", "lora_B"):
            found = _lookup(weights, f"{name}.{key}")
            if found is None:
                missing.append(f"{name}.{key}")
                continue
            getattr(state, key)[name] = _materialise(found).float().clone()
        if "scores" in ctrl:  # a pipeline checkpoint: a table per layer
            if name not in ctrl["scores"]:
                missing.append(f"{name}.lora_score")
            else:
                state.lora_score[name] = ctrl["scores"][name]
        elif table is not None and index < table.shape[0]:
            state.lora_score[name] = table[index].float().clone()
    if missing:
        raise ValueError(f"The checkpoint's weights lack {len(missing)} adapter tensors (e.g. {missing[:3]}); were "
                         "adapter parameters frozen or renamed? Nothing was written.")
    _check_checkpoint_shapes(state)
    return state, config


def pipeline_weights(tag_dir: str) -> Tuple[Dict[str, torch.Tensor], list, Dict[str, torch.Tensor]]:
    """A PipelineEngine checkpoint's adapter (docs/pipeline.md): (weights by whole-model name, every stage's module
    names in layer order, each module's score row). Each layer's file holds its modules and its score table (one
    row per module, in that layer's module order, which every process's controller state lists); the values are
    the working copy, the fp32 master when training in fp32 (DeepSpeed's zero_to_fp32 cannot read pipeline
    checkpoints, whose model files hold no module)."""
    weights, names = {}, []
    for path in sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt"))):
        match = re.fullmatch(r"layer_(\d+)-model_states\.pt", os.path.basename(path))
        if match is None:  # layer_XX-model_YY-...: one file per tensor-parallel slice of a layer
            raise ValueError(f"{path}: a pipeline checkpoint with tensor-parallel slices per layer cannot be exported "
                             "offline; export the adapter from the live engine with beamlora_ds.save_adapter.")
        index = int(match.group(1))
        for key, value in torch.load(path, map_location="cpu", weights_only=False).items():
            if "lora_" in key:
                weights[f"{index}.{key}"] = value
    for path in sorted(glob.glob(os.path.join(tag_dir, STATE_FILE.format(rank="*")))):
        state = torch.load(path, map_location="cpu", weights_only=False).get("beamlora", {})
        names += [n for n in state.get("module_names", []) if n not in names]
    first_seen = {name: i for i, name in enumerate(names)}
    names.sort(key=lambda n: (layer_number(n), first_seen[n]))
    scores = {}
    for name in names:
        layer = name.split(".")[0]
        mine = [n for n in names if n.split(".")[0] == layer]
        table = weights.get(f"{layer}.{TABLE_ATTRIBUTE}.lora_score")
        if table is not None and table.shape[0] == len(mine):
            scores[name] = table[mine.index(name)].float().clone()
    low = sorted({str(t.dtype) for t in weights.values() if t.dtype != torch.float32})
    if low:
        logger.warning("The pipeline checkpoint stores the adapter in %s; exporting that precision (save_adapter on "
                       "the live engine exports the fp32 master).", low)
    return weights, names, scores


def _lookup(weights: dict, key: str):
    """`key`, with or without a wrapper's `module.` prefix."""
    for candidate in (key, "module." + key):
        if candidate in weights:
            return weights[candidate]
    if key.startswith("module.") and key[len("module."):] in weights:
        return weights[key[len("module."):]]
    return None


def _materialise(tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()  # zero_to_fp32 lazy tensors


def _check_checkpoint_shapes(state: AdapterState) -> None:
    for name in state.module_names:
        a, b, s = state.lora_A[name], state.lora_B[name], state.lora_score[name]
        fits = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] == state.r and tuple(s.shape) == (state.r,)
        if not fits:
            raise ValueError(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)}, score {tuple(s.shape)} do not fit "
                             f"r={state.r}. The checkpoint and its BeamLoRA state disagree; nothing was written.")


def export_checkpoint(checkpoint_dir: str, out_dir: str, tag: Optional[str] = None, base_model: Optional[str] = None,
                      merge: bool = False, overwrite: bool = False, task_type: Optional[str] = "CAUSAL_LM",
                      rename: Optional[Callable[[str], str]] = None) -> str:
    """What `beamlora-export` does: a peft adapter (or, with merge, a merged model) from a DeepSpeed checkpoint
    (a PipelineEngine's: every stage's modules; `rename` as in save_adapter)."""
    problem = out_dir_problem(out_dir, overwrite)
    if problem:
        raise FileExistsError(problem)
    if merge and not base_model:
        raise ValueError("--merge needs --base_model PATH: the base weights are not in the adapter checkpoint.")
    trainer_folder = trainer_adapter_folder(checkpoint_dir, tag)
    if trainer_folder:  # a Trainer checkpoint-N (or its output_dir): it already holds our unfolded state
        state, config = adapter_state_from_folder(trainer_folder)
    else:
        state, config = adapter_state_from_checkpoint(checkpoint_dir, tag)
    targets = target_modules_from_config(config.get("target_modules", []), state.module_names)
    state, targets = renamed(state, targets, rename)
    if merge:
        return _export_merged(state, base_model, out_dir, overwrite)
    if trainer_folder:
        base_model = base_model or config.get("base_model_name_or_path")
    else:
        base_model = base_model or base_model_of_run(checkpoint_dir)
        state.fan_in_fan_out = fan_in_fan_out_of_base(base_model, state.module_names)
    write_adapter(state, out_dir, targets, task_type, base_model, overwrite)
    logger.info("Wrote a peft LoRA adapter (%d modules, r=%d, score folded into A) to %s",
                len(state.module_names), state.r, out_dir)
    return out_dir


def base_model_of_run(checkpoint_dir: str) -> Optional[str]:
    """The model a launch/train.py run trained, read from the run_args.json it writes beside its checkpoints folder,
    so an adapter exported without --base_model still names its base (None: no such file, or the built-in model)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "run_args.json")) as f:
            name = json.load(f).get("model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def fan_in_fan_out_of_base(base_model: Optional[str], module_names) -> bool:
    """peft's fan_in_fan_out for these modules of `base_model`: True when they are transformers Conv1D layers
    (GPT-2 style). The checkpoint cannot tell, since A and B have the same shapes for both layer types; the base
    model's architecture can, from its config alone (a weightless skeleton, loading.models.meta_skeleton).

    When the base is unknown or unreadable: False, right for nn.Linear bases; peft sets it per layer when it loads
    the adapter anyway (with a warning for a Conv1D layer)."""
    if not base_model:
        return False
    try:
        skeleton = meta_skeleton(base_model)
        conv1d = {name: is_conv1d_layout(skeleton.get_submodule(name)) for name in module_names}
    except (OSError, ValueError, RuntimeError, AttributeError) as e:
        logger.warning("Could not read the layer types of %s (%s): adapter_config.json says fan_in_fan_out=false, "
                       "right for nn.Linear layers. For GPT-2 style Conv1D layers peft corrects it when loading, with "
                       "a warning.", base_model, e)
        return False
    return fan_in_fan_out_of(conv1d)


def _export_merged(state: AdapterState, base_model: str, out_dir: str, overwrite: bool) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    merge_state_into(model, state)
    tokenizer = _tokenizer_or_none(base_model)
    save_merged(model, out_dir, overwrite=overwrite, tokenizer=tokenizer)
    logger.info("Merged %d BeamLoRA modules into a copy of %s (which is not modified) and saved the merged model "
                "to %s", len(state.module_names), base_model, out_dir)
    return out_dir


def _tokenizer_or_none(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        logger.info("No tokenizer in %s; the merged folder holds the model only.", path)
        return None
