"""checkpointing/save.py and load.py in one process: tag validation, the refusals of load_checkpoint, and the RNG round trip. Real
DeepSpeed saves and resumes (killed at every step of a save): tests/distributed/test_kill_resume.py."""
import os
import random
import types

import pytest
import torch

from beamlora_ds import BeamLoRAConfig, CheckpointDamagedError, CheckpointWriteError, apply
from beamlora_ds.checkpointing import manifest
from beamlora_ds.checkpointing.layout import STATE_FILE, validate_tag
from beamlora_ds.checkpointing.load import load_checkpoint
from beamlora_ds.checkpointing.rng import rng_state, set_rng_state
from beamlora_ds.checkpointing.save import save_checkpoint
from helpers import TwoLayerNet


@pytest.mark.parametrize("tag", ["", ".", "..", "latest", "a/b", "global_step4.partial", ".universal", ".hidden"])
def test_a_tag_that_cannot_name_a_checkpoint_folder_is_refused(tag):
    with pytest.raises(ValueError, match="plain folder name"):
        validate_tag(tag)


def test_a_plain_tag_is_accepted():
    assert validate_tag("global_step4") == "global_step4"
    assert validate_tag("best-so-far") == "best-so-far"


def test_save_checkpoint_refuses_a_bad_tag_before_writing(tmp_path):
    engine = types.SimpleNamespace(global_steps=3)  # never reached: the tag is checked first
    with pytest.raises(ValueError, match="plain folder name"):
        save_checkpoint(engine, beam=None, save_dir=str(tmp_path / "ckpt"), tag="latest")
    assert not (tmp_path / "ckpt").exists()


def test_load_checkpoint_explains_a_missing_or_moved_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        load_checkpoint(engine=None, beam=None, load_dir=str(tmp_path))
    (tmp_path / "latest").write_text("global_step8")
    with pytest.raises(FileNotFoundError, match="moved or deleted"):
        load_checkpoint(engine=None, beam=None, load_dir=str(tmp_path))
    (tmp_path / "global_step8").mkdir()
    with pytest.raises(CheckpointDamagedError, match="has no manifest.json: it was not written"):
        load_checkpoint(engine=None, beam=None, load_dir=str(tmp_path))


def test_rng_state_round_trip_repeats_the_draws():
    state = rng_state()
    first = (random.random(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def _write_checkpoint(folder, state):
    """A published checkpoint of one process holding `state` as its BeamLoRA state (and its manifest)."""
    (folder / "latest").write_text("global_step8")
    (folder / "global_step8").mkdir()
    torch.save({"beamlora": state, "rng": rng_state()}, str(folder / "global_step8" / STATE_FILE.format(rank=0)))
    manifest.write_manifest(str(folder / "global_step8"), "global_step8", 8, extra={"world_size": 1, "zero_stage": 2})


class EngineThatMustNotLoad:
    def __init__(self, model):
        self.module = model  # what the base fingerprint is read from

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("DeepSpeed was asked to load a checkpoint the controller cannot continue")


def test_a_checkpoint_of_another_state_version_is_refused_before_deepspeed_reads_it(tmp_path):
    """An earlier development version wrote another layout (version 1: one score parameter per module, so its
    DeepSpeed optimizer partitions do not fit either); loading stops with the way out, not inside DeepSpeed."""
    model = TwoLayerNet()
    beam = apply(model, BeamLoRAConfig(r=4, alpha=8.0, total_steps=40, interval=8))
    _write_checkpoint(tmp_path, dict(beam.state_dict(), version=1))
    with pytest.raises(ValueError, match="global_step8.*version 1.*reads version 2.*start a new run"):
        load_checkpoint(EngineThatMustNotLoad(model), beam, str(tmp_path))
    assert beam.global_step == 0


def test_a_checkpoint_of_another_tensor_parallel_split_is_refused_before_deepspeed_reads_it(tmp_path):
    """Its model and optimizer files are per slice: loading must stop with the way out, not inside DeepSpeed."""
    model = TwoLayerNet()
    beam = apply(model, BeamLoRAConfig(r=4, alpha=8.0, total_steps=40, interval=8))
    saved = beam.state_dict()
    saved["tensor_parallel"] = {beam.module_names[0]: ["column", [2, 2]]}
    _write_checkpoint(tmp_path, saved)
    with pytest.raises(ValueError, match="global_step8.*another tensor-parallel split.*beamlora-export"):
        load_checkpoint(EngineThatMustNotLoad(model), beam, str(tmp_path))


class StandInCheckpointEngine:
    def __init__(self, full_disk=False):
        self.full_disk = full_disk

    def save(self, state_dict, path):
        if self.full_disk:  # what torch.save raises when the disk fills up under it (not an OSError)
            raise RuntimeError(f"[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                               f"data/0: file write failed ({path})")
        torch.save(state_dict, path)


class StandInEngine:
    """Just enough of an engine for save_checkpoint's own staging, manifest and `latest`, writing through its
    checkpoint engine as DeepSpeed does (the launch test in tests/distributed/test_checkpoint_integrity.py fails
    DeepSpeed's real writes)."""

    def __init__(self, step, module, full_disk=False):
        self.global_steps, self.module = step, module
        self.checkpoint_engine = StandInCheckpointEngine(full_disk)

    def zero_optimization_stage(self):
        return 2

    def module_state_dict(self, exclude_frozen_parameters=False):
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad or not exclude_frozen_parameters}

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        module = self.module_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)
        self.checkpoint_engine.save({"module": module}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


@pytest.mark.parametrize("point", ["state", "deepspeed", "torch.save", "manifest", "latest"])
def test_a_failed_write_leaves_the_previous_checkpoint_and_latest(tmp_path, monkeypatch, point):
    model = TwoLayerNet()
    beam = apply(model, BeamLoRAConfig(r=4, alpha=8.0, total_steps=40, interval=8))
    save_dir = str(tmp_path)
    assert save_checkpoint(StandInEngine(2, model), beam, save_dir) == "global_step2"
    if point != "torch.save":
        monkeypatch.setenv("BEAMLORA_DS_FAIL_WRITE_AT", f"{point}@4")
    said = "No space left" if point != "torch.save" else "PytorchStreamWriter failed writing"
    with pytest.raises(CheckpointWriteError, match=f"{said}.*'latest' \\(global_step2\\) are untouched"):
        save_checkpoint(StandInEngine(4, model, full_disk=point == "torch.save"), beam, save_dir)
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert manifest.verify(str(tmp_path / "global_step2")) is None
    assert not (tmp_path / "global_step4.partial").exists()  # what the failed save wrote is freed
    # failing at `latest`, the new folder was already complete and published; `latest` did not move
    assert (tmp_path / "global_step4").exists() == (point == "latest")
    if point == "latest":
        assert manifest.verify(str(tmp_path / "global_step4")) is None
