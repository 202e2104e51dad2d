"""The complete scripts docs/ shows, run as a user would: examples/train_deepspeed.py in 2 processes (ZeRO-2;
resumed from its checkpoint between a snapshot and its reset, it ends with the adapter of the run that never
stopped), examples/train_ddp.py in 2 processes (the same, bit for bit, and one writer) and
examples/train_trainer.py; every adapter loads in stock peft."""
import os
import shutil
import sys

import torch

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(script, out, args, nproc=2):
    """An example as a user runs it; its stdout (the second try's, when a native abort at exit was retried: a fresh
    run starts again from nothing, a resumed one from the checkpoint the first try named `latest`)."""
    fresh = "--resume" not in args
    cmd = testing.spawn_command(os.path.join(ROOT, "examples", script), ["--out", out, *args], nproc)
    proc = testing.run(cmd, timeout=300, cwd=ROOT,
                       before_retry=(lambda: shutil.rmtree(out, ignore_errors=True)) if fresh else None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.split(testing.RETRIED)[-1]


def run_ds_example(out, *extra):
    return run_example("train_deepspeed.py", out, ["--steps", 16, "--interval", 4, "--save_every", 2, *extra])


def as_stopped_after(full, part, step, prefix="global_step"):
    """`part` as the run in `full` stood after its checkpoint of `step` (folders `<prefix><step>`): later checkpoints
    and the adapter not written yet, `latest` naming that checkpoint (what the example's --stop_at leaves)."""
    shutil.copytree(full, part)
    checkpoints = os.path.join(part, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.startswith(prefix) and int(name[len(prefix):]) > step:
            shutil.rmtree(os.path.join(checkpoints, name))
    shutil.rmtree(os.path.join(part, "adapter"))
    with open(os.path.join(checkpoints, "latest"), "w") as f:
        f.write(f"{prefix}{step}")


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def loads_in_stock_peft(folder):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_base(), folder).eval()
    ids = torch.arange(16)[None] % 64
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, tiny_base()(input_ids=ids).logits)


def test_deepspeed_example_trains_resets_and_resumes_exactly(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    said = run_ds_example(full)
    assert said.count("reset moved") == 3 and "done: 16 steps, 3 resets" in said  # resets at 4, 8, 12
    as_stopped_after(full, part, 10)  # snapshot at 10, its reset at 12
    resumed = run_ds_example(part, "--resume")
    assert "done: 16 steps, 3 resets" in resumed
    expected, got = adapter_tensors(os.path.join(full, "adapter")), adapter_tensors(os.path.join(part, "adapter"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-7), key
    assert os.path.getsize(os.path.join(full, "log.jsonl")) > 0
    loads_in_stock_peft(os.path.join(full, "adapter"))


def test_ddp_example_resumes_exactly_with_one_writer(tmp_path):
    """examples/train_ddp.py (docs/ddp.md) on 2 processes without DeepSpeed: every process calls save_adapter and
    process 0 alone writes (each process once took itself for process 0 and two wrote into one folder); resumed
    between a snapshot (10) and its reset (12), it ends with the adapter of the run that never stopped, bit for bit."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["--steps", 16, "--interval", 4, "--save_every", 2]
    said = run_example("train_ddp.py", full, args)
    assert said.count("reset moved") == 3 and said.count("done: 16 steps, 3 resets") == 1, said
    # one writer: no second process's temporary adapter folder (.adapter.partial-*) left beside the adapter
    assert sorted(os.listdir(full)) == ["adapter", "checkpoints", "log.jsonl"], os.listdir(full)
    as_stopped_after(full, part, 10, prefix="step-")
    assert "done: 16 steps, 3 resets" in run_example("train_ddp.py", part, [*args, "--resume"])
    expected, got = adapter_tensors(os.path.join(full, "adapter")), adapter_tensors(os.path.join(part, "adapter"))
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    loads_in_stock_peft(os.path.join(full, "adapter"))


def test_trainer_example_writes_an_adapter_stock_peft_loads(tmp_path):
    out = str(tmp_path / "hf")
    proc = testing.run([sys.executable, os.path.join(ROOT, "examples", "train_trainer.py"), "--out", out,
                        "--steps", 12, "--interval", 4], timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 12 steps, 2 resets" in proc.stdout
    assert "model.safetensors" not in os.listdir(os.path.join(out, "checkpoint-12"))
    loads_in_stock_peft(os.path.join(out, "adapter"))
