"""launch/train.py end to end under `deepspeed --num_gpus 2` (tiny built-in model): it trains, resets and writes
everything, loads a saved model folder partitioned under ZeRO-3, and leaves no DeepSpeed /dev/shm buffer behind.
(Stopping with --stop_after and continuing with --resume is checked with the kills in test_kill_resume.py.)"""
import json
import os

import pytest
import torch

from beamlora_ds import testing
from beamlora_ds.loading import builtin, models
from helpers import base_tensors_in_checkpoint
from train_runs import ROOT, TRAIN, read_log



@pytest.mark.parametrize("stage", [2, 3])
def test_trains_resets_and_writes_everything(uninterrupted_run, stage):
    out, proc = uninterrupted_run(stage)
    log = read_log(out)
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert [r["step"] for r in log if r["type"] == "reset"] == [4, 8, 12]
    assert sum(len(r["pruned"]) for r in log if r["type"] == "reset") > 0
    assert [r["when"] for r in log if r["type"] == "eval"] == ["before", "after"]
    assert os.path.isfile(os.path.join(out, "checkpoints", "latest"))
    assert os.path.isfile(os.path.join(out, "checkpoints", "global_step16", "beamlora_state_rank1.pt"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(os.path.join(out, "adapter")))
    assert "reset at step 4:" in proc.stdout and "done: 16 steps, 3 resets" in proc.stdout
    assert "| the built-in run's defaults" in proc.stderr  # the start-up line says which defaults apply


# run "$@", then print the /dev/shm buffers of its --master_port and exit with its status
LIST_SHM_AFTER = ('"$@"; status=$?; prev=; for a in "$@"; do [ "$prev" = --master_port ] && port=$a; prev=$a; done; '
                  'echo "leftover buffers:"; ls /dev/shm | grep "_${port}_"; exit $status')


def test_local_checkpoint_is_partitioned_at_load_under_zero3_and_no_shm_buffer_is_left(tmp_path):
    """A saved HF model folder loads under ZeRO-3 already partitioned (HfDeepSpeedConfig alive before
    from_pretrained), the path a 70B model takes; then trains and writes its adapter. DeepSpeed's CPU comm op leaks
    a 64 MB /dev/shm file per process and run; train.py removes its own: the launch runs inside a shell that lists
    the port's buffers once deepspeed has exited (before testing.run's own clean-up). With --save_base, its
    checkpoint holds the base too."""
    model_dir = tmp_path / "model"
    models.load_model(builtin.BUILTIN_TINY, torch.float32, {}).save_pretrained(model_dir)
    builtin.char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    cmd = testing.spawn_command(TRAIN, ["--output_dir", out, "--ds_config", "ds_configs/zero3.json",
                                            "--model_name_or_path", model_dir, "--lora_r", "8", "--max_steps", "8",
                                            "--interval", "4", "--logging_steps", "1", "--max_length", "64",
                                            "--save_base"])
    proc = testing.run(["sh", "-c", LIST_SHM_AFTER, "sh", *cmd], timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "loaded partitioned" in l)
    held, total = [int(x.replace(",", "")) for x in line.split("partitioned, ")[1].split(" parameters")[0]
                   .split(" of ")]
    assert 0 < held < total  # this process holds a shard, not the model
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    assert proc.stdout.split("leftover buffers:")[1].split() == []
    # --save_base: the checkpoint holds the base too (ZeRO-3 fragments), and its manifest says so
    checkpoint = out / "checkpoints" / "global_step8"
    assert base_tensors_in_checkpoint(str(checkpoint), models.load_model(builtin.BUILTIN_TINY, torch.float32, {}))
    assert json.loads((checkpoint / "manifest.json").read_text())["extra"]["base"]["included"] is True
