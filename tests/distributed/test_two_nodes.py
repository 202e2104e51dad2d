"""Two nodes simulated on one machine, launched as launch/slurm_70b.sbatch launches them: one `deepspeed` launcher per
node in `--no_ssh` mode (`--hostfile H --no_ssh --node_rank N --master_addr A --master_port P`), here node ranks 0
and 1 with one process each, on localhost. The uninterrupted run uses DeepSpeed's launcher itself; the others start
the same processes with the same variables through beamlora_ds/testing/spawn.py (without DeepSpeed's launcher
start-up).

The hostfile names two hosts ("node0 slots=1", "node1 slots=1"): in --no_ssh mode DeepSpeed never contacts them, it
only needs two entries so that --node_rank 1 is valid and the world is 2. Each launcher then starts its one process
with RANK = its node rank, WORLD_SIZE 2, LOCAL_RANK 0 and LOCAL_SIZE 1, so DeepSpeed's CPU shared-memory all-reduce
stays off (it needs every rank on one node) and every collective goes over gloo/TCP, as between real nodes.

- a shared output folder: the run trains as the one-launcher `deepspeed --num_gpus 2` run does (equal losses and
  adapter; measured when this file was written, not re-checked here); node 1's process SIGKILLed in step 4 (node 0
  fails on the broken connection within seconds, no dist-timeout wait); both resumed with --resume: the final
  adapter and the losses equal the uninterrupted run's.
- a folder per node (file systems the nodes do not share): refused at start on every node without DeepSpeed's
  node-local storage (and node-local storage on a shared folder is refused too); with it, each node publishes its own folder, and a resume after node 1 was killed between
  publishing and moving its `latest` agrees on the newest checkpoint both nodes have published and ends as the
  uninterrupted run.
"""
import json
import os

import pytest
import torch

from beamlora_ds import testing
from train_runs import ROOT, TRAIN

pytestmark = pytest.mark.slow
STEPS = 6
# the tiny built-in model, 6 steps: resets at 2 and 4, checkpoints at 2, 4 and 6; a stuck collective fails in 60 s
RUN = ["--model_name_or_path", "builtin-tiny", "--ds_config", "ds_configs/zero2.json", "--lora_r", "8", "--p0", "0.8",
       "--learning_rate", "3e-3", "--logging_steps", "1", "--eval_samples", "0", "--max_steps", str(STEPS),
       "--interval", "2", "--save_steps", "2", "--dist_timeout", "60"]
TIMEOUT = 240  # per pair of launches


def launch_two_nodes(tmp_path, out_dirs, *args, kill_node1_at=None, timeout=TIMEOUT, launcher="spawn"):
    """launch/train.py as a 2-node job: node 0 with --output_dir out_dirs[0], node 1 with out_dirs[1] (the same
    folder for a shared file system). `kill_node1_at`: a BEAMLORA_DS_KILL_AT spec for node 1's process only.
    `launcher` "deepspeed": one `deepspeed --hostfile H --no_ssh --node_rank N` per node, as launch/slurm_70b.sbatch
    runs it; "spawn": the same processes and variables without DeepSpeed's launcher start-up. A native abort with
    no Python error (beamlora_ds.testing.run's one retry) restarts both nodes once on a new port."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    base = {k: v for k, v in os.environ.items() if k != "BEAMLORA_DS_KILL_AT"}
    base.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    envs = [dict(base), dict(base, **({"BEAMLORA_DS_KILL_AT": kill_node1_at} if kill_node1_at else {}))]
    for attempt in range(2):
        port = testing.free_port()
        cmds = testing.node_commands(TRAIN, port, [["--output_dir", out, *args] for out in out_dirs],
                                     hostfile=hostfile if launcher == "deepspeed" else None)
        try:
            procs = testing.run_together(cmds, envs, timeout, cwd=ROOT)
        finally:
            testing.remove_shm_buffers(port)
        output = "".join(p.stdout for p in procs)
        if attempt or all(p.returncode == 0 for p in procs) or testing.NATIVE_CRASH not in output \
                or "Traceback" in output:
            return procs
        print(f"retrying a 2-node launch that aborted natively (port {port})")


def _tail(procs):
    return "\n".join(f"--- node {i} (exit {p.returncode}, {p.seconds:.0f} s)\n{p.stdout[-3000:]}"
                     for i, p in enumerate(procs))


def _ok(procs):
    assert all(p.returncode == 0 for p in procs), _tail(procs)


def _losses(out_dir):
    from beamlora_ds.telemetry.reset_log import current_records

    return {r["step"]: r["loss"] for r in current_records(os.path.join(out_dir, "log.jsonl")) if r["type"] == "train"}


def _adapter(out_dir):
    from safetensors.torch import load_file

    return {name: load_file(os.path.join(out_dir, "adapter", name)) for name in ("adapter_model.safetensors",
                                                                                 "beamlora_state.safetensors")}


def _assert_same_run(out_dir, reference):
    """Losses (1e-6) and final adapter (1e-5 relative) equal to the reference run's."""
    losses, expected = _losses(out_dir), _losses(reference)
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1)), (sorted(losses), sorted(expected))
    for step, loss in expected.items():
        assert abs(losses[step] - loss) <= 1e-6, (step, losses[step], loss)
    adapter, expected_adapter = _adapter(out_dir), _adapter(reference)
    for name, tensors in expected_adapter.items():
        assert tensors.keys() == adapter[name].keys()
        for key, value in tensors.items():
            assert torch.allclose(adapter[name][key], value, rtol=1e-5, atol=1e-8), (name, key)


@pytest.fixture(scope="module")
def two_node_reference(tmp_path_factory):
    """The uninterrupted 2-node run on a shared folder, by DeepSpeed's own launcher: (folder, its two launches)."""
    tmp = tmp_path_factory.mktemp("two_nodes_uninterrupted")
    out = tmp / "run"
    procs = launch_two_nodes(tmp, [out, out], *RUN, launcher="deepspeed")
    _ok(procs)
    return out, procs


def _tag_files(folder):
    return {tag: sorted(os.listdir(folder / tag)) for tag in sorted(os.listdir(folder))
            if os.path.isdir(folder / tag)}


# ----------------------------------------------------------------------------------------------------- the tests
def test_two_node_launch_on_a_shared_folder(two_node_reference):
    out, procs = two_node_reference
    assert "| 2 processes |" in procs[0].stdout  # node 0's rank 0 announces a world of two
    assert "done: 6 steps, 2 resets" in procs[0].stdout
    # each launcher started one process: node rank 0 -> global rank 0, node rank 1 -> global rank 1, local rank 0
    for node, p in enumerate(procs):
        assert f"--node_rank={node}" in p.stdout and "dist_world_size=2" in p.stdout
        assert "{'node0': [0], 'node1': [1]}" in p.stdout  # the launcher's global_rank_mapping line
    files = _tag_files(out / "checkpoints")
    assert sorted(files) == [f"global_step{s}" for s in (2, 4, 6)], files
    for tag, names in files.items():
        assert {"beamlora_state_rank0.pt", "beamlora_state_rank1.pt", "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(names)
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"


def test_node1_killed_then_both_resumed_end_as_the_uninterrupted_run(two_node_reference, tmp_path):
    reference, _ = two_node_reference
    out = tmp_path / "run"
    killed = launch_two_nodes(tmp_path, [out, out], *RUN, kill_node1_at="step@4:1")
    assert killed[1].returncode != 0 and "return code = -9" in killed[1].stdout, _tail(killed)
    # node 0 loses its peer in a collective and fails on the closed connection: no wait for the dist timeout (60 s)
    assert killed[0].returncode != 0 and killed[0].seconds < killed[1].seconds + 45, _tail(killed)
    assert (out / "checkpoints" / "latest").read_text() == "global_step2"
    resumed = launch_two_nodes(tmp_path, [out, out], *RUN, "--resume")
    _ok(resumed)
    assert "resumed from the checkpoint of step 2" in resumed[0].stdout
    _assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob("*.partial"))


def test_unshared_output_folders_are_refused_at_start(tmp_path):
    """Without node-local storage only process 0 publishes checkpoints: node 1's files would never be. Refused
    before the model loads, on every node's console, naming the fix."""
    procs = launch_two_nodes(tmp_path, [tmp_path / "node0", tmp_path / "node1"], *RUN, "--stop_after", "2")
    for p in procs:
        assert p.returncode != 0 and "is not shared by all processes" in p.stdout, _tail(procs)
        assert "use_node_local_storage" in p.stdout
    assert not (tmp_path / "node0" / "checkpoints").exists() and not (tmp_path / "node1" / "checkpoints").exists()


def node_local_config(tmp_path):
    with open(os.path.join(ROOT, "ds_configs", "zero2.json")) as f:
        ds = json.load(f)
    ds["checkpoint"] = {"use_node_local_storage": True}
    local_config = tmp_path / "zero2_node_local.json"
    local_config.write_text(json.dumps(ds))
    return [str(local_config) if a == "ds_configs/zero2.json" else a for a in RUN]


def test_node_local_storage_on_a_shared_folder_is_refused_at_start(tmp_path):
    """Each node's first process would rename the same checkpoint folders (seen before this check: a
    FileNotFoundError in one rename, and the loser deleting the winner's staging folder)."""
    out = tmp_path / "run"
    procs = launch_two_nodes(tmp_path, [out, out], *node_local_config(tmp_path))
    for p in procs:
        assert p.returncode != 0 and "the output folder" in p.stdout and "is shared by the nodes" in p.stdout, \
            _tail(procs)
    assert not (out / "checkpoints").exists()


def test_node_local_checkpoints_with_diverging_latest_resume_consistently(two_node_reference, tmp_path):
    """A folder per node with node-local storage: each node's local rank 0 publishes its own folder and moves its
    own `latest`. Node 1 killed between its rename and its `latest` leaves the nodes' `latest` at step 4 and 2: the
    resume agrees on the newest checkpoint every node has published (step 4: node 1's was renamed into place) and
    ends as the uninterrupted run."""
    reference, _ = two_node_reference
    run = node_local_config(tmp_path)
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    killed = launch_two_nodes(tmp_path, dirs, *run, kill_node1_at="latest@4:1")
    assert killed[1].returncode != 0, _tail(killed)
    assert [(d / "checkpoints" / "latest").read_text() for d in dirs] == ["global_step4", "global_step2"]
    resumed = launch_two_nodes(tmp_path, dirs, *run, "--resume")
    _ok(resumed)
    assert "Resuming from 'global_step4', the newest one every node has" in resumed[0].stdout, _tail(resumed)
    _assert_same_run(dirs[0], reference)
