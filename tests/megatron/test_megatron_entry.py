"""launch/train_megatron.py and examples/train_megatron.py as a user runs them (2 processes: the entry in two
pipeline stages, the example tensor and sequence parallel; on this CPU through tests/megatron/with_cpu_shims.py), and
the entry's refusals before anything loads."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIMS = os.path.join(ROOT, "tests", "megatron", "with_cpu_shims.py")
needs_megatron = pytest.mark.usefixtures("megatron_installed")  # conftest.py


def run_with_shims(script, args, nproc=2):
    from beamlora_ds.testing.launcher import launch

    return launch(SHIMS, [os.path.join(ROOT, script), *map(str, args)], nproc=nproc, timeout=600, cwd=ROOT)


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
@needs_megatron
def test_the_entry_trains_resets_exports_and_resumes_exactly(tmp_path):
    """Two pipeline stages (one layer each); tensor + sequence parallelism is the example's test below."""
    from beamlora_ds.testing.launcher import RETRIED

    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = ["--tensor_parallel", 1, "--pipeline_parallel", 2, "--steps", 12, "--interval", 4, "--save_every", 6,
              "--log_every", 1]
    output = run_with_shims("launch/train_megatron.py", [*common, "--output_dir", first]).split(RETRIED)[-1]
    assert "tensor parallel 1, pipeline parallel 2, data parallel 1, distributed optimizer, 8 modules" in output
    assert output.count("reset:") == 2  # once per reset, from process 0 (which holds the first stage)
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in output.splitlines() if line.startswith("step ")]
    assert len(losses) == 12 and min(losses) > 1.0  # the last stage's loss, reached to process 0
    records = [json.loads(line) for line in open(first / "log.jsonl")]
    assert [r["step"] for r in records] == [4, 8]
    config = json.load(open(first / "adapter" / "adapter_config.json"))
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert config["base_model_name_or_path"] == "builtin-tiny"
    os.makedirs(resumed)
    shutil.copytree(first / "checkpoints", resumed / "checkpoints")
    output = run_with_shims("launch/train_megatron.py", [*common, "--output_dir", resumed, "--resume"])
    assert "steps 12 (from 6)" in output
    a, b = adapter_tensors(first / "adapter"), adapter_tensors(resumed / "adapter")
    assert len(a) == 2 * 7 * 2 and {k.split(".layers.")[1].split(".")[0] for k in a} == {"0", "1"}  # both stages
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
@needs_megatron
def test_the_example_loop_learns_and_writes_a_peft_adapter(tmp_path):
    from beamlora_ds.testing.launcher import RETRIED

    output = run_with_shims("examples/train_megatron.py", ["--tensor_parallel", 2, "--sequence_parallel",
                                                           "--steps", 20, "--output_dir", tmp_path])
    output = output.split(RETRIED)[-1]  # a native abort at exit is retried once (docs/testing.md)
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in output.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert "reset pruned" in output
    assert len(adapter_tensors(tmp_path / "adapter")) == 2 * 7 * 2  # A and B of 7 projections in 2 layers


def entry():
    """launch/train_megatron.py as a module (it imports no megatron at module level)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_megatron", os.path.join(ROOT, "launch", "train_megatron.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, world, layers, says", [
    (["--tensor_parallel", "3"], 2, 2, "--tensor_parallel=3 does not divide the 2 processes"),
    (["--sequence_parallel"], 2, 2, "--sequence_parallel needs --tensor_parallel of 2 or more"),
    (["--tensor_parallel", "4"], 4, 2, "does not divide num_key_value_heads=2"),
    (["--tensor_parallel", "2", "--sequence_parallel", "--seq_length", "49"], 2, 2,
     "--seq_length=49 must be a multiple"),
    (["--lora_r", "100"], 1, 2, "--lora_r=100 is larger than the model's hidden size 64"),
    (["--pipeline_parallel", "2"], 3, 2, "--pipeline_parallel=2 with --tensor_parallel=1 does not divide the 3 "
     "processes"),
    (["--tensor_parallel", "2", "--pipeline_parallel", "2"], 2, 2,
     "--pipeline_parallel=2 with --tensor_parallel=2 does not divide the 2 processes"),
    (["--pipeline_parallel", "0"], 2, 2, "--pipeline_parallel=0 with --tensor_parallel=1 does not divide"),
    (["--pipeline_parallel", "2"], 2, 3, "--pipeline_parallel=2 does not divide the 3 layers of builtin-tiny"),
    (["--pipeline_parallel", "4"], 4, 2, "--pipeline_parallel=4 is more than the 2 layers of builtin-tiny: a stage "
     "would hold no layer and no BeamLoRA target"),
])
def test_the_entry_refuses_layouts_megatron_cannot_run_before_loading(argv, world, layers, says):
    from beamlora_ds.loading.models import load_config
    from beamlora_ds.train import megatron_run
    from beamlora_ds.train.checks import UsageError

    args = entry().parse_args([*argv, "--output_dir", "unused"])
    config = load_config("builtin-tiny")
    config.num_hidden_layers = layers  # builtin-tiny has 2
    with pytest.raises(UsageError, match=re.escape(says)):
        megatron_run.check_layout(args, world, config)


def test_the_reported_loss_survives_the_schedule_dividing_the_loss_in_place():
    """Megatron's schedule divides the returned loss by the number of micro-batches in place: the reported one is a
    copy (with a detached view, --accumulation 4 printed a quarter of the loss)."""
    import torch

    from beamlora_ds.train import megatron_run

    class PerToken(torch.nn.Module):  # a per-token loss of 2 everywhere
        def __init__(self):
            super().__init__()
            self.two = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, input_ids, position_ids, attention_mask, labels):
            return self.two.expand(input_ids.shape)

    batch = {"tokens": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long),
             "loss_mask": torch.tensor([[0.0, 1.0, 1.0, 0.0]] * 2)}
    output, loss_func = megatron_run.forward_step(iter([batch]), PerToken())
    loss, reported = loss_func(output)
    loss /= 4  # as schedules.forward_step_calc_loss does with 4 micro-batches
    assert reported["loss"].item() == 2.0


@needs_megatron
def test_the_entry_says_megatron_needs_a_gpu_where_there_is_none(tmp_path):
    """On this CPU as it is (no shims): one line, exit code 2, nothing written."""
    done = subprocess.run([sys.executable, "launch/train_megatron.py", "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, WORLD_SIZE="1"))
    assert done.returncode == 2 and "megatron-core needs a CUDA GPU" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not os.path.exists(tmp_path / "out")
