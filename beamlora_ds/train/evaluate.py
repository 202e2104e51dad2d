"""Exact-match evaluation by greedy generation, split over processes (ZeRO-3 safe: every process runs the same
number of generate calls with synced_gpus)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch


def exact_match(model, tokenizer, rows: Sequence[Dict[str, str]], template: str, *, rank: int = 0,
                world_size: int = 1, batch_size: int = 16, max_new_tokens: int = 8, synced_gpus: bool = False,
                all_reduce=None, logits_processors=()) -> float:
    """Fraction of rows whose generated answer (up to the first newline or eos) equals the response exactly.
    `logits_processors`: callables (input_ids, scores) -> scores given to generate, e.g. the one that gathers a
    vocabulary-parallel head's logits under tensor parallelism (autotp.vocab_gathering_processors)."""
    extra = {}
    if logits_processors:
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList(logits_processors)
    per_rank = len(rows) // world_size
    mine = list(rows[rank * per_rank:(rank + 1) * per_rank])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, per_rank, batch_size):
            batch = mine[start:start + batch_size]
            prompts = [tokenizer(template.format(prompt=r["prompt"]))["input_ids"] for r in batch]
            ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=synced_gpus, **extra)
            for row, generated in zip(batch, out[:, ids.shape[1]:]):
                correct += int(_answer(tokenizer, generated) == row["response"].strip())
    finally:
        model.train(was_training)
    totals = torch.tensor([correct, len(mine)], dtype=torch.float64)
    if all_reduce is not None:
        totals = all_reduce(totals)
    return float(totals[0] / max(totals[1], 1))


def _left_pad(sequences: List[List[int]], pad_id: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return ids, mask


def _answer(tokenizer, generated: torch.Tensor) -> str:
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return text.split("\n")[0].strip()
