"""`beamlora-export` (export/cli.py): argument checks and one-line errors. The end-to-end runs on real ZeRO
checkpoints are in tests/distributed/test_export_zero.py."""
import os

import pytest

from beamlora_ds.export import cli as export_cli


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
