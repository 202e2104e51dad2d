"""The three commands users type: installed as console scripts (setup.cfg) and runnable as `python -m`, each
printing its own usage. Their behaviour is tested where each lives (export/, telemetry/, checkpointing/)."""
import configparser
import importlib
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"beamlora-export": "beamlora_ds.export.cli", "beamlora-plot": "beamlora_ds.telemetry.plot",
            "beamlora-verify": "beamlora_ds.checkpointing.verify_cli"}


def test_setup_cfg_installs_each_command_from_its_module():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].split("\n") if line)
    assert scripts == {name: f"{module}:main" for name, module in COMMANDS.items()}
    for module in COMMANDS.values():
        assert callable(importlib.import_module(module).main)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: this process imported the module already
@pytest.mark.parametrize("name, module", COMMANDS.items())
def test_python_dash_m_runs_the_command(name, module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(module, run_name="__main__")
    assert exited.value.code == 0 and f"usage: {name}" in capsys.readouterr().out


def test_importing_the_package_does_not_import_a_command():
    """So `python -m <command module>` runs it fresh, without runpy's warning that the package imported it first."""
    code = f"import sys, beamlora_ds; print([m for m in {list(COMMANDS.values())} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
