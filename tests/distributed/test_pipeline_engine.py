"""examples/train_pipeline.py as a user runs it: BeamLoRA on DeepSpeed's PipelineEngine (ZeRO-1), 2 stages in 2
processes against the same script with 1 stage in 1 process (the one-process run of the same model): the same
losses, the same pruned sets at every reset (one top-p over both stages' modules), the same adapter; resumed from
its step-6 checkpoint (between a snapshot and its reset) it ends with the uninterrupted run's adapter; the adapter
(live, and offline from the last checkpoint) holds both stages' layers under the HF model's names and gives, in stock
peft, the evaluation loss the pipeline computed."""
import importlib.util
import json
import os
import re

import pytest
import torch

import beamlora_ds
from test_integration_examples import adapter_tensors, as_stopped_after, run_example

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_pipeline.py")


def run_pipeline_example(out, stages, *extra):
    return run_example("train_pipeline.py", out, ["--stages", stages, "--steps", 12, "--interval", 4, "--save_every", 6,
                                                  *extra], nproc=stages)


def losses(output):
    return {int(step): float(loss) for step, loss in re.findall(r"^step (\d+) loss ([\d.]+)", output, re.M)}


def pruned_sets(out):
    return [(r["step"], sorted(map(tuple, r["pruned"]))) for r in map(json.loads, open(os.path.join(out, "log.jsonl")))]


def example_module():
    spec = importlib.util.spec_from_file_location("train_pipeline", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_pipeline_stages_follow_one_and_resume_exactly(tmp_path):
    one, two, part = (str(tmp_path / name) for name in ("one", "two", "part"))
    reference, output = losses(run_pipeline_example(one, 1)), run_pipeline_example(two, 2)
    assert sorted(losses(output)) == list(range(1, 13))
    assert max(abs(reference[s] - loss) for s, loss in losses(output).items()) <= 1e-5
    assert pruned_sets(two) == pruned_sets(one) and [s for s, _ in pruned_sets(two)] == [4, 8]
    names = {name for _, pruned in pruned_sets(two) for name, _ in pruned}
    assert any(n.startswith("1.") for n in names) and any(n.startswith("2.") for n in names)  # both stages pruned
    a, b = adapter_tensors(os.path.join(two, "adapter")), adapter_tensors(os.path.join(one, "adapter"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert {int(k.split("layers.")[1].split(".")[0]) for k in a} == {0, 1} and len(a) == 2 * 7 * 2

    offline = str(tmp_path / "offline")  # the same adapter from the last checkpoint, no process group
    beamlora_ds.export_checkpoint(os.path.join(two, "checkpoints"), offline, rename=example_module().hf_name)
    exported = adapter_tensors(offline)
    assert exported.keys() == a.keys() and all(torch.equal(exported[k], a[k]) for k in a)

    as_stopped_after(two, part, 6)
    run_pipeline_example(part, 2, "--resume")
    resumed = adapter_tensors(os.path.join(part, "adapter"))
    assert resumed.keys() == a.keys() and all(torch.equal(resumed[k], a[k]) for k in a)

    from peft import PeftModel

    from beamlora_ds.loading.builtin import tiny_llama

    example = example_module()
    stream = example.batches(1, 0, 4, 1)  # what the example's eval_batch reads: 2 micro-batches of the seed+1 stream
    evaluation = [next(stream) for _ in range(2)]
    def mean_loss(model):
        with torch.no_grad():
            return sum(model(ids, labels=labels).loss.item() for ids, labels in evaluation) / len(evaluation)

    peft_loss = mean_loss(PeftModel.from_pretrained(tiny_llama(torch.float32), os.path.join(two, "adapter")).eval())
    assert abs(peft_loss - float(re.search(r"eval loss ([\d.]+)", output).group(1))) <= 1e-5
    assert abs(mean_loss(tiny_llama(torch.float32)) - peft_loss) > 1e-3  # the adapter changed the model
