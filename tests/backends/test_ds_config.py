"""Reading DeepSpeed configs: clear errors for missing and malformed files, and the settings read before an engine
exists (stage, precision, parameter offload, node-local checkpoints, AutoTP degree)."""
import json

import pytest

from beamlora_ds.backends.deepspeed.config import (DSConfigError, autotp_size, load_ds_config, node_local_storage,
                                                   offload_param_device, precision, zero_stage)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DSConfigError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(DSConfigError, match="line 1, column"):
        load_ds_config(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([1]))
    with pytest.raises(DSConfigError, match="JSON object"):
        load_ds_config(str(listed))
    with pytest.raises(DSConfigError, match="stage=4"):
        zero_stage({"zero_optimization": {"stage": 4}})


def test_settings_read_from_a_config():
    """The one reading of these settings that launch/train.py and the loaders share (supported_setups.py judges
    them)."""
    assert zero_stage(None) == zero_stage({}) == 0
    assert zero_stage(load_ds_config("ds_configs/zero3.json")) == 3
    assert precision({"fp16": {"enabled": True}}) == "fp16"
    assert precision({"bf16": {"enabled": True}}) == "bf16"
    assert precision({}) == precision({"bf16": {"enabled": False}}) == "fp32"
    assert offload_param_device(load_ds_config("ds_configs/zero3_offload.json")) == "cpu"
    assert offload_param_device({"zero_optimization": {"stage": 3, "offload_param": None}}) is None
    assert offload_param_device({}) is None
    assert autotp_size(load_ds_config("ds_configs/tp2_zero1.json")) == 2
    assert autotp_size({}) == autotp_size(None) == 1
    assert node_local_storage({"checkpoint": {"use_node_local_storage": True}}) is True
    assert node_local_storage({}) is False
