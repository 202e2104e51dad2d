"""Data loading, response-only labels, and the deterministic per-rank batch order used for exact resume."""
import json

import pytest

from beamlora_ds.train import data
from beamlora_ds.loading.builtin import char_tokenizer


def test_builtin_task_has_exact_answers():
    rows = data.arithmetic_examples(50, seed=3)
    assert rows == data.arithmetic_examples(50, seed=3)
    for r in rows:
        a, op, b = r["prompt"][len("What is "):-1].split()
        assert int(r["response"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_local_files_and_saved_folders_load(tmp_path):
    import datasets

    rows = [{"q": "What is 1 + 1?", "a": "2"}, {"q": "What is 2 - 1?", "a": "1"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert data.load_examples(str(jsonl), prompt_field="q", response_field="a")[1] == {"prompt": "What is 2 - 1?",
                                                                                        "response": "1"}
    csv = tmp_path / "d.csv"
    csv.write_text("q,a\nWhat is 1 + 1?,2\n")
    assert len(data.load_examples(str(csv), prompt_field="q", response_field="a")) == 1
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    assert len(data.load_examples(str(folder), prompt_field="q", response_field="a")) == 2


def test_dataset_problems_are_refused_with_the_fix(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"question": "x", "answer": "y"}))
    with pytest.raises(data.DataError, match=r"no field\(s\) \['prompt', 'response'\].*--prompt_field"):
        data.load_examples(str(jsonl))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.load_examples(str(tmp_path / "d.txt"))


def test_labels_cover_only_the_response_and_eos():
    tok = char_tokenizer()
    [ex] = data.tokenize_examples([{"prompt": "1+1", "response": "2"}], tok, "Q: {prompt}\nA: ", max_length=64)
    prompt_len = len(tok("Q: 1+1\nA: ")["input_ids"])
    assert ex["labels"][:prompt_len] == [data.IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == tok("2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(data.DataError, match="--max_length=3"):
        data.tokenize_examples([{"prompt": "1+1", "response": "2"}], tok, "Q: {prompt}", max_length=3)
    with pytest.raises(data.DataError, match="{prompt}"):
        data.tokenize_examples([{"prompt": "1", "response": "2"}], tok, "no placeholder", max_length=64)


def test_micro_batches_partition_each_epoch_and_resume_midway():
    def take(rank, n, start=0):
        it = data.micro_batches(10, micro_batch=2, world_size=2, rank=rank, seed=0, start_micro_step=start)
        return [next(it) for _ in range(n)]

    epoch0 = take(0, 2) + take(1, 2)  # 10 // 4 = 2 global micro-batches per epoch; 2 examples dropped
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 8
    assert take(0, 5)[3:] == take(0, 2, start=3)  # skipping into the stream gives the same batches
    assert take(0, 4)[2:] != take(0, 2)  # a new epoch reshuffles
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        next(data.micro_batches(3, micro_batch=2, world_size=2, rank=0, seed=0))


@pytest.mark.parametrize("n", [23, 24, 40])  # 23: each epoch's tail is not a whole global batch
def test_micro_batches_follow_the_global_batch_not_the_world_size(n):
    """The same global batch of 8 split four ways (micro 2, accumulation x processes = 1x4, 2x2, 4x1, and micro 4
    x 1 x 2 is another split: other micro-batches) gives, step by step, the same micro-batches across epochs."""
    def steps(micro, accumulation, world, n_steps=7, start_step=0):
        streams = [data.micro_batches(n, micro, world, rank, seed=3, start_micro_step=start_step * accumulation,
                                      accumulation=accumulation) for rank in range(world)]
        out = []
        for _ in range(n_steps):
            per_rank = [[next(s) for _ in range(accumulation)] for s in streams]
            out.append(sorted(sorted(b) for rank_batches in per_rank for b in rank_batches))
        return out

    reference = steps(2, 1, 4)
    assert steps(2, 2, 2) == reference and steps(2, 4, 1) == reference
    assert steps(2, 2, 2, n_steps=4, start_step=3) == reference[3:]  # a resume on another world size
    per_epoch = data.steps_per_epoch(n, 2, 4, 1)
    assert per_epoch == n // 8 and data.steps_per_epoch(n, 2, 1, 4) == per_epoch
    epoch = [i for batch in reference[:per_epoch] for i in sum(batch, [])]
    assert len(set(epoch)) == len(epoch) == per_epoch * 8  # each epoch: no example twice
