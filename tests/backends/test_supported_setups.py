"""supported_setups.check_zero_support: every ZeRO stage / precision / offload combination BeamLoRA refuses, with the
fix its caller's user can apply, and every one it trains under (docs/platform.md)."""
import enum

import pytest

from beamlora_ds.backends.deepspeed.supported_setups import (PRECISIONS, UnsupportedSetupError, check_engine_support,
                                                             check_zero_support, engine_setup)

NVME = "Set offload_param.device to \"cpu\""
STAGE0_LIBRARY = "Use ZeRO stage 1, 2 or 3 (set zero_optimization.stage)"
STAGE0_CLI = "Set zero_optimization.stage to 1, 2 or 3 (e.g. --ds_config ds_configs/zero2.json)"
STAGE0_4BIT = "Use ZeRO stage 2 (ds_configs/qlora_single.json"
FP16_CLI = "launch/train.py does not support yet: set fp16.enabled to false"


@pytest.mark.parametrize("args, kwargs, words", [
    # NVMe parameter offload: refused at every stage and precision, whoever asks, before anything else
    ((3, "fp32", "nvme"), {}, NVME),
    ((3, "bf16", "NVMe"), {"cli": True}, NVME),
    ((0, "bf16", "nvme"), {"four_bit": True}, NVME),
    # launch/train.py has no fp16 path, at any stage
    ((2, "fp16"), {"cli": True}, FP16_CLI),
    ((0, "fp16"), {"cli": True}, FP16_CLI),
    ((3, "fp16"), {"cli": True, "four_bit": True}, FP16_CLI),
    # ZeRO-0 in half precision: the fix follows the caller
    ((0, "bf16"), {}, "ZeRO stage 0 with bf16: BeamLoRA cannot edit DeepSpeed's private fp32 copies there. "
                      + STAGE0_LIBRARY),
    ((0, "fp16"), {}, "ZeRO stage 0 with fp16: "),
    ((0, "bf16"), {"cli": True}, STAGE0_CLI),
    ((0, "bf16"), {"four_bit": True}, STAGE0_4BIT),
    ((0, "fp16"), {"four_bit": True}, STAGE0_4BIT),
    ((0, "bf16"), {"cli": True, "four_bit": True}, STAGE0_4BIT),
])
def test_refused_with_the_fix(args, kwargs, words):
    with pytest.raises(UnsupportedSetupError) as refused:
        check_zero_support(*args, **kwargs)
    assert words in str(refused.value)
    assert isinstance(refused.value, ValueError)  # what callers that catch ValueError expect


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("offload", [None, "cpu", "none"])
def test_stages_1_to_3_train_in_any_precision_without_nvme(stage, precision, offload):
    check_zero_support(stage, precision, offload)
    check_zero_support(stage, precision, offload, four_bit=True)
    if precision != "fp16":
        check_zero_support(stage, precision, offload, cli=True)


@pytest.mark.parametrize("kwargs", [{}, {"cli": True}, {"four_bit": True}])
def test_stage_0_trains_in_fp32(kwargs):
    check_zero_support(0, "fp32", None, **kwargs)


def test_an_unknown_precision_is_a_programming_error():
    with pytest.raises(ValueError, match="use one of") as raised:
        check_zero_support(2, "float16")
    assert not isinstance(raised.value, UnsupportedSetupError)


class _Device(enum.Enum):  # DeepSpeed reports the offload device as an enum
    cpu = "cpu"
    nvme = "nvme"


class _Engine:
    def __init__(self, stage, bf16=False, fp16=False, offload=None):
        self.stage, self.bf16, self.fp16, self.offload = stage, bf16, fp16, offload

    def zero_optimization_stage(self):
        return self.stage

    def bfloat16_enabled(self):
        return self.bf16

    def fp16_enabled(self):
        return self.fp16

    def zero_offload_param(self):
        return None if self.offload is None else type("Offload", (), {"device": self.offload})()


def test_engine_setup_reads_stage_precision_and_offload():
    assert engine_setup(_Engine(3, bf16=True, offload=_Device.nvme)) == (3, "bf16", "nvme")
    assert engine_setup(_Engine(0, fp16=True)) == (0, "fp16", None)
    assert engine_setup(_Engine(2, offload=_Device.cpu)) == (2, "fp32", "cpu")


def test_engine_refusals_use_the_library_fix():
    with pytest.raises(UnsupportedSetupError, match="Use ZeRO stage 1, 2 or 3"):
        check_engine_support(_Engine(0, bf16=True))
    with pytest.raises(UnsupportedSetupError, match="NVMe"):
        check_engine_support(_Engine(3, offload=_Device.nvme))
    check_engine_support(_Engine(0))
    check_engine_support(_Engine(3, fp16=True, offload=_Device.cpu))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused_with_pipelines_before_anything_is_built(stage, tmp_path):
    """DeepSpeed's PipelineEngine asserts against them inside deepspeed.initialize, after the model is built:
    check_deepspeed_setup says it first, from the config (a dict or its JSON file)."""
    import json

    from beamlora_ds import check_deepspeed_setup

    config = {"zero_optimization": {"stage": stage}}
    with pytest.raises(UnsupportedSetupError, match=f"ZeRO stage {stage} with 2 pipeline stages: DeepSpeed's "
                                                    "PipelineEngine refuses ZeRO-2 and ZeRO-3.*Set zero_optimization"
                                                    r"\.stage to 1"):
        check_deepspeed_setup(config, pipeline_stages=2)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedSetupError, match="pipeline stages"):
        check_deepspeed_setup(str(path), pipeline_stages=2)
    check_deepspeed_setup(config)  # without a pipeline: trains
    check_deepspeed_setup({"zero_optimization": {"stage": 1}}, pipeline_stages=2)
