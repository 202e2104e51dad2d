"""`beamlora-export` (export_cli.py): argument checks and one-line errors. The end-to-end runs on real ZeRO
checkpoints are in tests/distributed/test_export_zero.py."""
import os
import subprocess
import sys

import pytest

from beamlora_ds import export_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_merge_needs_a_base_model(capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.parse_args(["ckpt", "out", "--merge"])
    assert e.value.code == 2 and "--base_model" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path, caplog):
    (tmp_path / "ckpt").mkdir()
    assert export_cli.main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "no 'latest' file" in caplog.text and not os.path.exists(tmp_path / "out")


def test_task_type_none_means_a_plain_peft_model():
    assert export_cli.parse_args(["ckpt", "out", "--task_type", "none"]).task_type is None
    assert export_cli.parse_args(["ckpt", "out"]).task_type == "CAUSAL_LM"


def test_python_m_beamlora_ds_export_still_runs_the_command():
    """The old address (`python -m beamlora_ds.export`, console script `beamlora_ds.export:main`) still works."""
    proc = subprocess.run([sys.executable, "-m", "beamlora_ds.export", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: beamlora-export" in proc.stdout
