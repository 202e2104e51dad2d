"""Checkpoints that cannot be trusted are never loaded, and a failed write loses nothing (docs/failure_handling.md).

One 2-process ZeRO-2 run whose checkpoint of step 4 fails to write on process 1 (an injected ENOSPC inside
DeepSpeed's own writes): the run stops with one error line, `latest` still names step 2, intact. In this
process, a flipped byte and a truncation in every file of that real checkpoint are found by load_checkpoint
before DeepSpeed or the controller are touched (they are None here). Then `--resume` finishes the run; a damaged
step-4 checkpoint is refused naming the file; `--resume auto` falls back to step 2 and ends with the same adapter.
"""
import os
import shutil

import pytest
import torch

import beamlora_ds
from beamlora_ds.checkpointing import load as checkpoint_load, manifest
from helpers import flip_middle_byte, truncate_last_byte
from train_runs import launch_train

pytestmark = pytest.mark.slow

RUN = ["--model_name_or_path", "builtin-tiny", "--lora_r", "4", "--max_steps", "4", "--interval", "2", "--p0", "0.5",
       "--lora_dropout", "0", "--logging_steps", "1", "--save_steps", "2", "--ds_config", "ds_configs/zero2.json"]


def adapter(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def test_failed_write_and_damaged_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    ckpts = os.path.join(run, "checkpoints")
    env = dict(os.environ, BEAMLORA_DS_FAIL_WRITE_AT="deepspeed@4:1")
    failed = launch_train(run, *RUN, env=env)
    assert failed.returncode != 0
    assert "error: Could not write checkpoint 'global_step4' (step 4)" in failed.stderr
    assert "No space left on device" in failed.stderr and "'latest' (global_step2) are untouched" in failed.stderr
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "global_step2"
    assert not os.path.exists(os.path.join(ckpts, "global_step4"))
    assert manifest.verify(os.path.join(ckpts, "global_step2")) is None

    files = manifest.read_manifest(os.path.join(ckpts, "global_step2"))["files"]
    kinds = {"mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "beamlora_state_rank1.pt"}
    assert kinds <= set(files)
    for name in sorted(files):
        for damage, word in ((flip_middle_byte, "corrupted"), (truncate_last_byte, "truncated")):
            copy = str(tmp_path / f"copy-{damage.__name__}-{name}")
            shutil.copytree(ckpts, copy)
            damage(os.path.join(copy, "global_step2", name))
            with pytest.raises(beamlora_ds.CheckpointDamagedError, match=f"{name}.*{word}"):
                checkpoint_load.load_checkpoint(None, None, copy)  # no engine: found before anything is loaded
            shutil.rmtree(copy)

    resumed = launch_train(run, *RUN, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = adapter(run)
    flip_middle_byte(os.path.join(ckpts, "global_step4", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    refused = launch_train(run, *RUN, "--resume")
    assert refused.returncode == 2
    assert "error: Checkpoint" in refused.stderr and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in refused.stderr
    assert "--resume auto" in refused.stderr
    fallback = launch_train(run, *RUN, "--resume", "auto")
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "Resuming from 'global_step2' instead" in fallback.stdout + fallback.stderr
    for name, value in adapter(run).items():  # steps 3-4 redone from the same checkpoint: the same adapter
        assert torch.allclose(value, finished[name], rtol=1e-6, atol=1e-8), name
