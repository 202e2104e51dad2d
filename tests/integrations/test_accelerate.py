"""accelerate with BeamLoRA, run as docs/accelerate.md shows it: examples/train_accelerate.py in 2 processes, under
DeepSpeed ZeRO-2 through accelerate's DeepSpeedPlugin and without DeepSpeed (accelerate's DDP). In each mode the run
resets at 4, 8 and 12, and a run resumed from its checkpoint of step 6 (after the snapshot at 6, before the reset
at 8, which moves ranks: the snapshot is used) ends with the adapter of the run that never stopped; one process
writes the adapter, which stock peft loads with the trained model's logits. And accelerate's own checkpointing of
the controller (`register_for_checkpointing(beam)`, one copy saved by process 0 for every process) is refused on
process 1 when it loads, naming the fix, where it would otherwise load process 0's snapshot shard; beam.step() given
the optimizer accelerate returns under DeepSpeed is refused too. This file is also that check's 2-process worker
(`python test_accelerate.py FOLDER`)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))

from test_integration_examples import adapter_tensors, as_stopped_after, run_example, tiny_base  # noqa: E402

ARGS = ["--steps", 16, "--interval", 4]  # snapshots at 2, 6, 10; resets at 4, 8, 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(zero) -> (folder of the run that never stopped, folder of the run resumed from its step 6, what the
    first said), once per mode and module."""
    done = {}

    def get(zero):
        if zero not in done:
            base = tmp_path_factory.mktemp(f"accelerate_zero{zero}")
            full, part = str(base / "full"), str(base / "part")
            # (spawn.py gives each process one thread, as torchrun does)
            said = run_example("train_accelerate.py", full, [*ARGS, "--zero", zero, "--save_every", 6])
            # one writer: no second process's temporary adapter folder (.adapter.partial-*) left beside it
            assert sorted(os.listdir(full)) == ["adapter", "checkpoints", "log.jsonl"], os.listdir(full)
            as_stopped_after(full, part, 6)
            # no checkpoint of its own: a retry after a native abort at exit resumes from step 6 again
            resumed = run_example("train_accelerate.py", part, [*ARGS, "--zero", zero, "--save_every", 100,
                                                                "--resume"])
            assert "step 4: reset" not in resumed and "step 8: reset moved 2" in resumed, resumed  # from 6 on
            done[zero] = (full, part, said)
        return done[zero]

    return get


def worst_difference(first, second):
    expected, got = adapter_tensors(os.path.join(first, "adapter")), adapter_tensors(os.path.join(second, "adapter"))
    assert expected.keys() == got.keys() and len(expected) == 28  # A and B of 7 projections x 2 layers
    return max((got[k] - expected[k]).abs().max().item() for k in expected)


def check_run(full, said):
    """Resets at 4, 8, 12, said once; the reset log written once (process 0)."""
    assert said.count("reset moved") == 3 and said.count("done: 16 steps, 3 resets") == 1, said
    assert all(f"step {t}: reset" in said for t in (4, 8, 12)), said
    with open(os.path.join(full, "log.jsonl")) as f:
        assert len(f.read().splitlines()) == 3


def beamlora_and_peft_logits(adapter):
    """Logits of the BeamLoRA model holding the run's final (unfolded) tensors, of stock peft with the exported
    adapter, and of the base alone, on the same base and ids."""
    import peft

    import beamlora_ds
    from beamlora_ds.export.adapter_format import load_state
    from beamlora_ds.integrations.hf_trainer import load_adapter_into

    state = load_state(adapter)
    model = tiny_base()
    beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=state.r, alpha=state.alpha, tau=state.tau,
                                                        total_steps=4, interval=2))
    with torch.no_grad():
        load_adapter_into(model, adapter)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return (model.eval()(input_ids=ids).logits, peft.PeftModel.from_pretrained(tiny_base(), adapter).eval()(
            input_ids=ids).logits, tiny_base()(input_ids=ids).logits)


@pytest.mark.slow
def test_zero2_through_accelerate_resets_resumes_exactly_and_exports_for_peft(runs):
    full, part, said = runs(2)
    check_run(full, said)
    checkpoint = os.listdir(os.path.join(full, "checkpoints", "global_step6"))  # beamlora_ds.save_checkpoint's
    assert {"beamlora_state_rank0.pt", "beamlora_state_rank1.pt", "manifest.json"} <= set(checkpoint), checkpoint
    worst = worst_difference(full, part)
    assert worst <= 1e-6, worst
    beamlora, peft, base = beamlora_and_peft_logits(os.path.join(full, "adapter"))
    assert (peft - beamlora).abs().max() <= 1e-5, (peft - beamlora).abs().max()
    assert (peft - base).abs().max() > 1e-3  # the adapter changes the model


@pytest.mark.slow
def test_ddp_through_accelerate_resumes_exactly_with_one_writer(runs):
    full, part, said = runs(0)
    check_run(full, said)
    checkpoint = sorted(os.listdir(os.path.join(full, "checkpoints", "global_step6")))
    assert "beamlora_rank0.pt" in checkpoint and "beamlora_rank1.pt" in checkpoint, checkpoint
    assert not [name for name in checkpoint if name.startswith("custom_checkpoint")], checkpoint
    worst = worst_difference(full, part)
    assert worst <= 1e-6, worst
    # the same training as under ZeRO-2 (fp32, the same data and clipping): the same adapter
    assert worst_difference(full, runs(2)[0]) <= 1e-6


@pytest.mark.slow
def test_accelerate_checkpointing_of_the_controller_is_refused(tmp_path):
    """register_for_checkpointing(beam) + save_state / load_state under ZeRO-2: accelerate saves process 0's state
    once and every process loads it; process 1, whose snapshot shard differs, refuses it naming the fix. Also
    beam.step() given the optimizer accelerate returned, or the ZeRO optimizer inside it, is refused."""
    from beamlora_ds import testing

    cmd = testing.spawn_command(os.path.abspath(__file__), [str(tmp_path / "state")], 2)
    proc = testing.run(cmd, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stdout.split(testing.RETRIED)[-1]
    assert "process 0 loaded its state" in said, said
    assert "process 1 (snapshot shard unlike process 0's) refused: Cannot resume: this BeamLoRA state was saved " \
           "by process 0 of 2, and this is process 1 of 2" in said, said
    assert "beamlora_ds.save_checkpoint / load_checkpoint" in said and "register_for_checkpointing" in said, said
    for wrong in ("DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer"):  # what prepare returns is not what to step
        assert f"process 1: beam.step({wrong}) refused: BeamController.step() got {wrong}, but this model is " \
               "trained by a DeepSpeed engine. Pass the DeepSpeed engine itself" in said, said


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def refusal_worker(folder):
    """The controller registered for accelerate's checkpointing under ZeRO-2, saved after a snapshot and loaded
    back; each process says what it got."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

    import beamlora_ds

    PartialState(cpu=True)
    model = tiny_base()
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8, total_steps=8, interval=4))
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model, weight_decay=0.0), lr=1e-2)
    plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                           "zero_optimization": {"stage": 2}})
    accelerator = Accelerator(deepspeed_plugin=plugin)
    engine, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(beam)
    for wrong in (optimizer, optimizer.optimizer):  # accelerate's wrapper, and the ZeRO optimizer inside it
        try:
            beam.step(wrong)
        except TypeError as error:
            print(f"process {accelerator.process_index}: beam.step({type(wrong).__name__}) refused: {error}",
                  flush=True)
    ids = (torch.arange(16)[None] + torch.tensor([[accelerator.process_index], [7]])) % 64
    for _ in range(beam.next_events()["snapshot"]):  # through the snapshot for the reset at 4
        accelerator.backward(engine(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
        beam.step(engine)
    accelerator.save_state(folder)
    accelerator.wait_for_everyone()
    saved = torch.load(os.path.join(folder, "custom_checkpoint_0.pkl"), weights_only=False)
    unlike = "" if same(saved["snapshot"], beam.state_dict()["snapshot"]) else " (snapshot shard unlike process 0's)"
    try:
        accelerator.load_state(folder)
        print(f"process {accelerator.process_index} loaded its state{unlike}", flush=True)
    except ValueError as error:
        print(f"process {accelerator.process_index}{unlike} refused: {error}", flush=True)


if __name__ == "__main__":
    refusal_worker(sys.argv[-1])
