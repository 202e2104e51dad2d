"""Export from a Hugging Face Trainer run: its `checkpoint-N` folders (and `trainer.save_model` folders) already
hold an adapter, written by integrations/hf_trainer.py: the folded peft files plus our unfolded state
(adapter_format.py). beamlora-export re-reads the unfolded state, so it can name another base, change the task
type, or merge.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Tuple

from .adapter_format import ADAPTER_CONFIG, STATE_CONFIG, AdapterState, load_state

CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def is_adapter_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_CONFIG))


def trainer_adapter_folder(path: str, tag: Optional[str]) -> Optional[str]:
    """The adapter folder to export when `path` is a Trainer checkpoint (or save_model) folder, or a Trainer
    output_dir holding checkpoint-N folders (`tag` picks one, default the highest N); None for anything else
    (a DeepSpeed checkpoint folder is handled by from_checkpoint.py)."""
    if is_adapter_folder(path):
        if tag:
            raise FileNotFoundError(f"{path!r} is one Trainer checkpoint (it holds the adapter): drop --tag {tag}, or "
                                    "pass the run's output_dir with --tag checkpoint-N.")
        return path
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "latest")):
        return None
    steps = {int(m.group(1)): name for name in os.listdir(path) if (m := CHECKPOINT.match(name))
             and is_adapter_folder(os.path.join(path, name))}
    if not steps:
        return None
    if tag:
        if tag not in steps.values():
            raise FileNotFoundError(f"{path!r} has no Trainer checkpoint {tag!r} with a BeamLoRA adapter; it has "
                                    f"{[steps[s] for s in sorted(steps)][-5:]}.")
        return os.path.join(path, tag)
    return os.path.join(path, steps[max(steps)])


def adapter_state_from_folder(folder: str) -> Tuple[AdapterState, dict]:
    """The unfolded adapter and what its adapter_config.json says (target_modules, base_model_name_or_path)."""
    state = load_state(folder)
    try:
        with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    return state, config
