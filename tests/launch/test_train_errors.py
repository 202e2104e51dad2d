"""launch/train.py refuses bad input with one clear line (exit 2) before any expensive work, writing nothing.

The table runs in this process, through train.main: every refusal in it comes before torch.distributed is
initialised (the process-group start is replaced by a tripwire that fails the case if it is reached). A few cases
also run end to end as `python launch/train.py`, for the real exit code and the absence of a Traceback.
"""
import importlib.util
import json
import os
import sys

import pytest
import torch

from beamlora_ds import testing
from beamlora_ds.train.processes import LaunchEnvironmentError, rank_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = ["--model_name_or_path", "builtin-tiny", "--lora_r", "8", "--max_steps", "20", "--interval", "4"]
# rank 0 of a 2-process launch, as deepspeed/torchrun announce it
TWO_PROCESSES = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _write_json(path, value):
    path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.json").write_text('{"zero_optimization": {"stage": 2,}}')
    _write_json(d / "list.json", [{"zero_optimization": {"stage": 2}}])
    _write_json(d / "micro2.json", {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
    _write_json(d / "bf16_off.json", {"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}})
    _write_json(d / "stage4.json", {"zero_optimization": {"stage": 4}})
    _write_json(d / "stage0.json", {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 0}})
    _write_json(d / "nvme.json", {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme",
                                                                                       "nvme_path": "/local_nvme"}}})
    _write_json(d / "fp16.json", {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    _write_json(d / "tbs6.json", {"train_batch_size": 6, "zero_optimization": {"stage": 2}})
    _write_json(d / "tbs3.json", {"train_batch_size": 3, "zero_optimization": {"stage": 2}})
    _write_json(d / "tp2.json", {"tensor_parallel": {"autotp_size": 2}, "zero_optimization": {"stage": 1}})
    _write_json(d / "tp4.json", {"tensor_parallel": {"autotp_size": 4}, "zero_optimization": {"stage": 1}})
    (d / "fields.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text('{"prompt": "What is 1 + 1?", "response": "2"}\n{"prompt": oops}\n')
    (d / "ok.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                                        for i in range(40)))
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("user data")
    # a finished run's output dir, trained with --lora_r 4 (the cases below ask for 8)
    (d / "resumable" / "checkpoints" / "global_step4").mkdir(parents=True)
    (d / "resumable" / "checkpoints" / "latest").write_text("global_step4")
    (d / "resumable" / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)))
    (d / "resumable" / "log.jsonl").write_text('{"type": "train", "step": 4, "loss": 1.5}\n')
    _write_json(d / "resumable" / "run_args.json", {"model_name_or_path": "builtin-tiny", "lora_r": 4,
                                                     "interval": 4, "max_steps": 20, "tau": 0.05})
    # a model folder with a config and no weights: refusals that need the architecture must come before loading
    # (a weight load here would fail with a Traceback, failing the test)
    from beamlora_ds.loading import builtin

    builtin.tiny_llama_config().save_pretrained(d / "config_only")
    # bitsandbytes made unimportable in the subprocess, to test OUR refusal path (not bitsandbytes itself)
    (d / "no_bnb" / "bitsandbytes").mkdir(parents=True)
    (d / "no_bnb" / "bitsandbytes" / "__init__.py").write_text(
        'raise ImportError("simulated: bitsandbytes is not installed")\n')
    return d


def case(name, argv, words, env=None, hidden=()):
    """`hidden`: modules made unimportable (as if not installed) for the case."""
    return pytest.param(argv, words, env or {}, hidden, id=name)


Z2 = ["--ds_config", "ds_configs/zero2.json"]
CASES = [
    # DeepSpeed config: missing, malformed, conflicting with the command line, impossible batch
    case("no ds_config", [], "--ds_config is required"),
    case("missing ds_config", ["--ds_config", "{d}/nope.json"], "does not exist"),
    case("malformed ds_config", ["--ds_config", "{d}/bad.json"], "not valid JSON"),
    case("ds_config not an object", ["--ds_config", "{d}/list.json"], "must hold a JSON object"),
    case("config vs command line", ["--ds_config", "{d}/micro2.json", "--per_device_train_batch_size", "4"],
         "train_micro_batch_size_per_gpu=2 but the command line sets --per_device_train_batch_size 4"),
    case("bf16 config vs --bf16", ["--ds_config", "{d}/bf16_off.json", "--bf16"], "bf16.enabled=False"),
    case("fp16 config", ["--ds_config", "{d}/fp16.json"], "set fp16.enabled to false"),
    case("train_batch_size not the product", ["--ds_config", "{d}/tbs6.json"],
         "train_batch_size=6 in the DeepSpeed config is not micro-batch 4 x accumulation 1 x 1 processes = 4"),
    # rank 0 of a 2-process launch: refused before it waits for the other process (else: a hang, then timeout)
    case("world size does not divide train_batch_size", ["--ds_config", "{d}/tbs3.json", "--dist_timeout", "60"],
         "cannot be split over 2 processes", env=TWO_PROCESSES),
    case("micro-batch 0", [*Z2, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0 is out of"),
    # ZeRO settings BeamLoRA cannot work under
    case("unknown ZeRO stage", ["--ds_config", "{d}/stage4.json"], "zero_optimization.stage=4: use 0, 1, 2 or 3"),
    case("ZeRO-0 with bf16", ["--ds_config", "{d}/stage0.json", "--bf16"], "Set zero_optimization.stage to 1, 2 or 3"),
    case("NVMe parameter offload", ["--ds_config", "{d}/nvme.json"], "Set offload_param.device to \"cpu\""),
    # 4-bit
    case("4-bit without bitsandbytes", [*Z2, "--quantization", "nf4"], "pip install 'bitsandbytes>=",
         hidden=("bitsandbytes",)),
    case("4-bit with ZeRO-0 bf16", ["--ds_config", "{d}/stage0.json", "--bf16", "--quantization", "nf4"],
         "ds_configs/qlora_single.json"),
    # output dir and resume
    case("non-empty output dir", [*Z2, "--output_dir", "{d}/full"], "not empty"),
    case("resume without checkpoint", [*Z2, "--resume"], "no checkpoint"),
    case("resume non-empty dir without checkpoint", [*Z2, "--output_dir", "{d}/full", "--resume"], "no checkpoint"),
    case("resume from a different config", [*Z2, "--output_dir", "{d}/resumable", "--resume"],
         "--lora_r: was 4, now 8"),
    case("resume with another tau", [*Z2, "--output_dir", "{d}/resumable", "--resume", "--lora_r", "4",
                                      "--tau", "0.1"], "--tau: was 0.05, now 0.1"),
    # data
    case("missing fields", [*Z2, "--dataset", "{d}/fields.jsonl"], "--prompt_field"),
    case("empty dataset", [*Z2, "--dataset", "{d}/empty.jsonl"], "empty.jsonl' is an empty file"),
    case("malformed dataset", [*Z2, "--dataset", "{d}/broken.jsonl"], "check that it is valid JSON"),
    case("all too long", [*Z2, "--dataset", "{d}/ok.jsonl", "--max_length", "4"], "longer than --max_length=4"),
    case("batch larger than data", [*Z2, "--dataset", "{d}/ok.jsonl", "--per_device_train_batch_size", "64"],
         "make no full optimizer step of 64 x 1 x 1"),
    case("template without {prompt}", [*Z2, "--prompt_template", "Question: "], "has no {prompt}"),
    case("template with another field", [*Z2, "--prompt_template", "Q: {prompt} {topic}"], "cannot be filled"),
    # target modules and rank, checked on the architecture before any weight is read
    case("targets match nothing", [*Z2, "--target_modules", "query_key_value"], "matched no module"),
    case("rank too large", [*Z2, "--lora_r", "100"], "larger than the smaller dimension"),
    case("targets match nothing, config only", [*Z2, "--model_name_or_path", "{d}/config_only",
                                                "--target_modules", "query_key_value"], "matched no module"),
    case("model folder without config.json", [*Z2, "--model_name_or_path", "{d}/full"],
         "cannot read the model's config"),
    case("rank too large, config only", [*Z2, "--model_name_or_path", "{d}/config_only", "--lora_r", "40"],
         "--lora_r=40 is larger than the smaller dimension of ['model.layers.0.self_attn.k_proj (64->32)'"),
    # BeamLoRA schedule values out of range
    case("interval too long", [*Z2, "--interval", "15"], "--interval=15 is too long for total_steps=20"),
    case("interval 0", [*Z2, "--interval", "0"], "--interval=0: the reset interval T must be an integer >= 2"),
    case("interval 1", [*Z2, "--interval", "1"], "--interval=1: the reset interval T must be an integer >= 2"),
    case("lora_r 0", [*Z2, "--lora_r", "0"], "--lora_r=0: BeamLoRA needs at least 2 ranks"),
    case("lora_r negative", [*Z2, "--lora_r", "-4"], "--lora_r=-4: BeamLoRA needs at least 2 ranks"),
    case("p0 out of range", [*Z2, "--p0", "1.5"], "--p0=1.5"),
    case("tau not positive", [*Z2, "--tau", "0"], "--tau=0"),
    case("t_end 0", [*Z2, "--t_end", "0"], "--t_end=0: must be a positive integer"),
    case("t_end past the run", [*Z2, "--t_end", "21"], "--t_end=21 is past the end of the run (total_steps=20)"),
    # tensor parallelism (AutoTP): what it cannot train, before any process waits or any weight is read
    case("tp not dividing the processes", ["--ds_config", "{d}/tp2.json"], "does not divide the number of processes 1"),
    case("tp with 4-bit", ["--ds_config", "{d}/tp2.json", "--quantization", "nf4"], "4-bit bases cannot be split",
         env=TWO_PROCESSES),
    case("tp with dropout", ["--ds_config", "{d}/tp2.json", "--lora_dropout", "0.1"], "Set the dropout to 0",
         env=TWO_PROCESSES),
    case("tp with fused targets", ["--ds_config", "{d}/tp2.json", "--target_modules", "qkv_proj,o_proj"],
         "Fused projections ['qkv_proj']", env=TWO_PROCESSES),
    case("tp above the kv heads", ["--ds_config", "{d}/tp4.json"], "exceeds the model's 2 key-value heads",
         env={**TWO_PROCESSES, "WORLD_SIZE": "4"}),
    # step counts
    case("stop_after negative", [*Z2, "--stop_after", "-1"], "--stop_after -1 is out of range"),
    case("save_steps negative", [*Z2, "--save_steps", "-5"], "--save_steps -5 is out of range"),
    case("logging_steps 0", [*Z2, "--logging_steps", "0"], "--logging_steps 0 is out of range"),
]


def _tree(root):
    """Every folder and file under root with its bytes: a refused run leaves a user's folders exactly as they were."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _argv(argv, files, out):
    argv = [a.replace("{d}", str(files)) for a in argv]
    return [*TINY, *argv] + ([] if "--output_dir" in argv else ["--output_dir", str(out)])


@pytest.fixture(scope="module")
def train():
    """launch/train.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_process(train, monkeypatch, entry_logging_undone):
    """train.main in this process: no process group may start (a tripwire), the launcher's variables come from
    the case only, and the logging setup main() makes is undone afterwards."""
    def tripwire(*args, **kwargs):
        raise AssertionError("the refusal did not come before torch.distributed would be initialised")

    assert not torch.distributed.is_initialized()
    monkeypatch.setattr(train.processes, "init_distributed", tripwire)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    yield train
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("argv, words, env, hidden", CASES)
def test_refused_cleanly(in_process, files, tmp_path, monkeypatch, capsys, argv, words, env, hidden):
    """Exit code 2, one 'error:' line naming the problem and the fix, no Traceback, nothing written."""
    out = tmp_path / "out"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    before = _tree(files)
    with pytest.raises(SystemExit) as exited:
        in_process.main(_argv(argv, files, out))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()
    assert _tree(files) == before


END_TO_END = [  # a fresh `python launch/train.py` each: what a user sees, exit code included
    case("malformed ds_config", ["--ds_config", "{d}/bad.json"], "not valid JSON"),
    case("rank 0 of 2 refuses without waiting", ["--ds_config", "{d}/tbs3.json", "--dist_timeout", "60"],
         "cannot be split over 2 processes", env=TWO_PROCESSES),
    case("bitsandbytes that fails to import", [*Z2, "--quantization", "nf4"], "pip install 'bitsandbytes>=",
         env={"PYTHONPATH": "{d}/no_bnb"}),
]


@pytest.mark.parametrize("argv, words, env, hidden", END_TO_END)
def test_refused_cleanly_end_to_end(files, tmp_path, argv, words, env, hidden):
    out = tmp_path / "out"
    case_env = {k: v.replace("{d}", str(files)) for k, v in env.items()}
    env = {**testing.single_process_env(), **case_env}  # rank 0 of 1 on a free port, unless the case says otherwise
    if "PYTHONPATH" in case_env and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    before = _tree(files)
    proc = testing.run([sys.executable, TRAIN, *_argv(argv, files, out)], timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert _tree(files) == before


def test_resume_checks_every_setting_the_controller_checks(train):
    """One list (config.RESUME_FIELDS): what BeamController.load_state_dict would refuse after loading, train.py
    refuses by flag before anything loads (total_steps through --max_steps)."""
    from beamlora_ds.method.config import RESUME_FIELDS
    from beamlora_ds.train.checks import CONFIG_FLAGS, RESUME_FLAGS

    # every field but total_steps has its own flag (a new field without one must be added to CONFIG_FLAGS)
    assert {f for f in RESUME_FIELDS if f not in CONFIG_FLAGS} == {"total_steps"}
    assert {CONFIG_FLAGS[f] for f in RESUME_FIELDS if f != "total_steps"} | {"--max_steps"} <= set(RESUME_FLAGS)
    args = vars(train.parse_args(["--ds_config", "x.json"]))  # every flag compared is one train.py really has
    assert all(flag[2:] in args for flag in RESUME_FLAGS), [f for f in RESUME_FLAGS if f[2:] not in args]


def test_rank_environment_from_launchers():
    assert rank_environment({"RANK": "3", "WORLD_SIZE": "8"}) == {}
    srun = rank_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "node1"})
    assert (srun["RANK"], srun["WORLD_SIZE"], srun["LOCAL_RANK"], srun["MASTER_ADDR"]) == ("5", "16", "1", "node1")
    ompi = rank_environment({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "2", "MASTER_ADDR": "a"})
    assert (ompi["RANK"], ompi["WORLD_SIZE"], ompi["LOCAL_RANK"]) == ("2", "4", "2")
    assert rank_environment({})["WORLD_SIZE"] == "1"
    with pytest.raises(LaunchEnvironmentError, match="MASTER_ADDR"):
        rank_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_help_names_every_default_and_explains_the_method_flags(train, capsys):
    """--help says what each BeamLoRA flag means and its default (the paper's run and the built-in run)."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--lora_r LORA_R rank r of every adapter (default 64; built-in run 8)",
                     "--tau TAU softmax temperature", "(default 0.05)", "--p0 P0 keep-fraction at the first reset",
                     "(default 0.95; built-in run 0.8)", "--t_end T_END step at which the keep-fraction reaches 1",
                     "--prompt_field PROMPT_FIELD field holding each example's prompt (default 'prompt')",
                     "--output_dir OUTPUT_DIR run folder", "(required; built-in run 'outputs/builtin')"):
        assert expected in text, expected
