"""Prompt/response data: loading (hub, JSON/JSONL/CSV, saved folders, the built-in task), tokenizing with the
loss on the response only, and a deterministic per-rank batch order that a resumed run can skip into.
"""
from __future__ import annotations

import os
import random
from typing import Dict, Iterator, List, Optional, Sequence

import torch

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer: "
IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset problem, found before training starts; the message says what to change."""


# ----------------------------------------------------------------------------------------- built-in task
def arithmetic_examples(n: int, seed: int) -> List[Dict[str, str]]:
    """Two-number addition and subtraction questions with exact answers (the built-in default task)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
        out.append({"prompt": f"What is {a} {op} {b}?", "response": str(a + b if op == "+" else a - b)})
    return out


# ------------------------------------------------------------------------------------------------ loading
def load_examples(dataset: Optional[str], split: str = "train", prompt_field: str = "prompt",
                  response_field: str = "response", builtin_size: int = 2000, seed: int = 0) -> List[Dict[str, str]]:
    """Rows as {"prompt", "response"} from the built-in task (dataset None), a local file/folder or the hub."""
    if dataset is None:
        return arithmetic_examples(builtin_size, seed)
    rows = _load_rows(dataset, split)
    if len(rows) == 0:
        raise DataError(f"Dataset {dataset!r} (split {split!r}) is empty.")
    columns = list(rows[0].keys()) if isinstance(rows, list) else list(rows.column_names)
    missing = [f for f in (prompt_field, response_field) if f not in columns]
    if missing:
        raise DataError(f"Dataset {dataset!r} has no field(s) {missing}; its fields are {columns}. "
                        "Pass --prompt_field and --response_field.")
    return [{"prompt": str(r[prompt_field]), "response": str(r[response_field])} for r in rows]


def _load_rows(dataset: str, split: str):
    import datasets

    if os.path.isdir(dataset):
        if os.path.isfile(os.path.join(dataset, "dataset_info.json")) or \
                os.path.isfile(os.path.join(dataset, "dataset_dict.json")):
            loaded = datasets.load_from_disk(dataset)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        raise DataError(f"{dataset!r} is a folder but not one saved by datasets' save_to_disk.")
    if os.path.isfile(dataset):
        ext = os.path.splitext(dataset)[1].lower()
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(ext)
        if builder is None:
            raise DataError(f"{dataset!r}: unsupported file type {ext!r}; use .json, .jsonl or .csv.")
        try:
            return datasets.load_dataset(builder, data_files=dataset, split="train")
        except Exception as e:  # malformed files surface as many different exception types
            inner = e
            while inner.__cause__ is not None or inner.__context__ is not None:  # the parser's own words
                inner = inner.__cause__ or inner.__context__
            reason = str(inner).strip() or type(inner).__name__
            raise DataError(f"Could not read {dataset!r} as {builder} ({reason}): check that it is valid "
                            f"{builder.upper()} with one example per {'row' if builder == 'csv' else 'record'}.") from e
    if dataset.startswith((".", "/")) or dataset.endswith((".json", ".jsonl", ".csv")):
        raise DataError(f"Dataset file {dataset!r} does not exist.")
    return datasets.load_dataset(dataset, split=split)


# --------------------------------------------------------------------------------------------- tokenizing
def tokenize_examples(rows: Sequence[Dict[str, str]], tokenizer, template: str = DEFAULT_TEMPLATE,
                      max_length: int = 512) -> List[Dict[str, List[int]]]:
    """input_ids = prompt + response + eos; labels are IGNORE_INDEX on the prompt. Longer examples are dropped."""
    if "{prompt}" not in template:
        raise DataError(f"--prompt_template {template!r} must contain '{{prompt}}'.")
    out, too_long = [], 0
    for row in rows:
        prompt_ids = tokenizer(template.format(prompt=row["prompt"]))["input_ids"]
        response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt_ids + response_ids
        if len(ids) > max_length:
            too_long += 1
            continue
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids})
    if not out:
        raise DataError(f"Every one of the {len(rows)} examples is longer than --max_length={max_length} tokens; "
                        "raise --max_length.")
    return out


def collate(examples: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def micro_batches(n_examples: int, micro_batch: int, world_size: int, rank: int, seed: int,
                  start_micro_step: int = 0, accumulation: int = 1) -> Iterator[List[int]]:
    """Endless example indices for this data-parallel rank, one micro-batch per call.

    The order is defined by the global batch G = micro_batch x accumulation x world_size, not by how it is
    split: epoch e is a permutation seeded by (seed, e), cut into global batches of G (the incomplete tail is
    dropped), each cut into G / micro_batch micro-batches; micro-batch j of a global batch goes to rank
    j % world_size at accumulation step j // world_size. So 2 processes taking one micro-batch each and 1
    process accumulating two see the same examples in the same micro-batches, and a run resumed on another
    number of processes (same global batch) continues on the same data (docs/training.md, "Resuming on a
    different number of GPUs"). Skips `start_micro_step` micro-steps (accumulation steps) first.
    """
    global_batch = micro_batch * accumulation * world_size
    per_epoch = n_examples // global_batch
    if per_epoch == 0:
        raise DataError(f"{n_examples} examples are fewer than one global batch ({micro_batch} per process x "
                        f"{accumulation} accumulation x {world_size} processes).")
    micro_step = start_micro_step
    while True:
        step, accumulated = divmod(micro_step, accumulation)
        epoch, within = divmod(step, per_epoch)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        first = within * global_batch + (accumulated * world_size + rank) * micro_batch
        yield order[first: first + micro_batch]
        micro_step += 1


def steps_per_epoch(n_examples: int, micro_batch: int, world_size: int, accumulation: int) -> int:
    """Optimizer steps per epoch: whole global batches (micro_batches() drops the tail)."""
    return n_examples // (micro_batch * world_size * accumulation)
