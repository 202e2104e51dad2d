"""The three commands users type: installed as console scripts (setup.cfg) and runnable as `python -m`, each
printing its own usage. Their behaviour is tested where each lives (export/, telemetry/, checkpointing/)."""
import configparser
import importlib
import os
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


@pytest.mark.parametrize("name, module", COMMANDS.items())
def test_python_dash_m_runs_the_command(name, module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"usage: {name}" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # the package does not import the command's module first
