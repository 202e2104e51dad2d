"""The HF Trainer runs that tests/integrations/test_hf_trainer.py (in this process) and
tests/distributed/test_hf_zero.py (under ZeRO, 2 processes) share: hf_worker.py's runs and what their resume and
checkpoints must show."""
import glob
import os

import torch

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "hf_worker.py")


def run_worker(runs, ds_stage=-1, deepspeed_procs=0):
    """Each run ({"out", "stop_at", "resume": a checkpoint folder}) in turn: hf_worker.train() in this process, or
    hf_worker.py in `deepspeed_procs` processes (one launch per run); their results."""
    if not deepspeed_procs:
        import hf_worker

        return [hf_worker.train(**run) for run in runs]
    results = []
    for run in runs:
        args = ["--out", run["out"], "--stop_at", run.get("stop_at", 0), "--ds_stage", ds_stage]
        if run.get("resume"):  # by name: testing.run may retry a native abort, which must not resume a later one
            args += ["--resume", run["resume"]]
        proc = testing.run(testing.spawn_command(WORKER, args, deepspeed_procs), timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(torch.load(os.path.join(run["out"], "result.pt"), weights_only=False))
    return results


def check_resume_is_exact(tmp_path, ds_stage=-1, deepspeed_procs=0):
    """The run that never stopped (checkpoints at steps 6 and 12), and a run resumed from its step-6 checkpoint into
    another folder: it ends with exactly the same adapter and resets. (A run stopped at step 6 writes the same
    checkpoint-6; tests/integrations/test_hf_trainer.py stops one.)"""
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    checkpoint = os.path.join(full_dir, "checkpoint-6")
    full, resumed = run_worker([{"out": full_dir}, {"out": part_dir, "resume": checkpoint}], ds_stage,
                               deepspeed_procs)
    assert full["global_step"] == 12
    assert [step for step, _ in full["history"]] == [4, 8]  # optimizer steps, not the 24 micro-steps
    assert len(full["history"][0][1]) > 0
    assert os.path.isfile(os.path.join(checkpoint, "beamlora_state_rank0.pt"))
    check_checkpoint_is_adapter_sized(checkpoint)
    assert resumed["global_step"] == 12 and resumed["history"] == full["history"]
    for name, value in full["weights"].items():
        assert torch.allclose(resumed["weights"][name], value, rtol=1e-6, atol=1e-7), name


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def check_checkpoint_is_adapter_sized(checkpoint):
    """A Trainer checkpoint holds what is trainable plus our state, never the frozen base: no model file, and no
    tensor anywhere in it (DeepSpeed's module states and shards, optimizer, our state) shaped like a base weight.
    On this tiny model the adapter is a tenth of the base, so bytes alone could not tell; shapes can (every base
    weight here is 32-172 x 64-172, every adapter tensor has a side of r = 4; flat ZeRO shards are 1-D)."""
    from safetensors import safe_open

    from beamlora_ds.loading import builtin, models

    names = os.listdir(checkpoint)
    assert "model.safetensors" not in names and "pytorch_model.bin" not in names, names
    base_shapes = {tuple(p.shape) for p in models.load_model(builtin.BUILTIN_TINY, torch.float32, {}).parameters()
                   if p.dim() == 2}
    for path in glob.glob(os.path.join(checkpoint, "**", "*"), recursive=True):
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
        elif path.endswith((".pt", ".pth", ".bin")):
            shapes = [tuple(t.shape) for t in tensors_in(torch.load(path, map_location="cpu", weights_only=False))]
        else:
            continue
        leaked = [shape for shape in shapes if shape in base_shapes]
        assert not leaked, f"{path} holds base-shaped tensors {leaked[:3]}"
    # and in bytes: ~12x the adapter file (folded + unfolded copies, fp32 master and two moments, the snapshot's
    # shards, ~100 KB of small files) measures 0.3-0.5 MB here; one copy of the base would add 0.4 MB
    adapter = os.path.getsize(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert folder_bytes(checkpoint) < 12 * adapter + 120_000, (folder_bytes(checkpoint), adapter, sorted(names))


def tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)
