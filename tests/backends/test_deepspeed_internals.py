"""Every DeepSpeed internal that backends/deepspeed/internals.py relies on, pinned: each test names the function of
internals.py that breaks when the installed DeepSpeed changes the private name, the attribute or the signature it
uses (docs/platform.md, "DeepSpeed internals we rely on"). The behaviour behind them is tested by the real multi-process
runs in tests/distributed/; these fail loudly, in seconds, on an upgrade."""
import argparse
import inspect
import re

import pytest


def source_of(obj) -> str:
    return inspect.getsource(obj)


def parameters(fn):
    return list(inspect.signature(fn).parameters)


def test_stage12_mapping_and_in_zero_optimizer():
    """Stage 1/2 set `param._hp_mapping` on every parameter of its groups (None where this process holds no
    fragment) and link a held fragment as a `tensor_fragment` with `lp_fragment_address` (start, numel) and
    `get_hp_fragment(key)`."""
    import importlib

    from deepspeed.utils import mixed_precision_linkage

    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")  # the package exports a same-named class
    linking = source_of(mixed_precision_linkage)
    assert "lp_param._hp_mapping = None" in linking and "lp_param._hp_mapping = get_hp_fragment_mapping(" in linking
    fields = {f.name for f in tensor_fragment.fragment_address.__dataclass_fields__.values()}
    assert {"start", "numel"} <= fields
    assert "lp_fragment_address" in tensor_fragment.tensor_fragment.__dataclass_fields__
    assert parameters(tensor_fragment.tensor_fragment.get_hp_fragment)[:2] == ["self", "optim_state_key"]


def test_zero3_partition_rank_and_in_zero_optimizer():
    """Stage 3 attaches itself to each parameter (`_z3_optimizer`) and knows which partition a shard is."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "p._z3_optimizer = self" in source_of(DeepSpeedZeroOptimizer_Stage3)
    assert parameters(DeepSpeedZeroOptimizer_Stage3._get_param_partition_rank) == ["self", "param"]


@pytest.mark.parametrize("module, name", [("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
                                          ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer")])
def test_relink_stage12_moments(module, name):
    """After a load, setting `_hp_optimizer_states_linked` to False makes `_lazy_init_hp_params_optimizer_state`
    link the moments again."""
    import importlib

    optimizer = getattr(importlib.import_module(module), name)
    relink = source_of(optimizer._lazy_init_hp_params_optimizer_state)
    assert "if not self._hp_optimizer_states_linked:" in relink and "self._hp_optimizer_states_linked = True" in relink
    assert parameters(optimizer._lazy_init_hp_params_optimizer_state) == ["self"]


def test_hf_tp_plan():
    from deepspeed.runtime.tensor_parallel import config

    assert parameters(config._get_hf_tp_plan) == ["model"]


def test_init_tensor_parallel_group():
    from deepspeed.utils import groups

    assert "tensor_model_parallel_size" in parameters(groups._init_tp_mesh_device)


def test_partition_sizes():
    """AutoTP's layers keep how they split their dimension in `_partition_sizes` (uneven for grouped-query
    attention)."""
    from deepspeed.module_inject import layers

    assert "self._partition_sizes = tuple(" in source_of(layers)
    for cls in (layers.LinearLayer, layers.LinearAllreduce):
        assert issubclass(cls, layers.TensorParallel_Layer)


def test_universal_checkpoint_loading():
    """The engine keeps its config as `_config`, whose `load_universal_checkpoint` the load reads."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "self._config = " in source_of(DeepSpeedEngine.__init__)
    assert "self.load_universal_checkpoint = " in source_of(DeepSpeedConfig)
    assert "load_universal_checkpoint" in source_of(DeepSpeedEngine)


def test_checkpoint_writes_wrapped():
    """Every checkpoint file goes through `engine.checkpoint_engine.save(state_dict, path)`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert parameters(TorchCheckpointEngine.save)[:3] == ["self", "state_dict", "path"]
    assert "self.checkpoint_engine.save(" in source_of(DeepSpeedEngine)


def test_base_left_out_of_checkpoints():
    """engine.save_checkpoint takes `exclude_frozen_parameters` (the Trainer does not pass it), and the module state
    it saves comes from `self.module_state_dict(...)`, which the context manager cuts to the trainable parameters."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "exclude_frozen_parameters" in parameters(DeepSpeedEngine.save_checkpoint)
    assert "exclude_frozen_parameters" in parameters(DeepSpeedEngine.module_state_dict)
    assert "self.module_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)" in \
        source_of(DeepSpeedEngine._save_checkpoint)


def test_convert_to_universal_files():
    """`ds_to_universal.main(args)` reads exactly the arguments internals.py passes it."""
    from deepspeed.checkpoint import ds_to_universal

    from beamlora_ds.backends.deepspeed import internals

    passed = set(re.findall(r"(\w+)=", source_of(internals.convert_to_universal_files).split("Namespace(")[1]))
    read = set(re.findall(r"\bargs\.(\w+)", source_of(ds_to_universal)))
    assert read <= passed, f"ds_to_universal now reads {sorted(read - passed)}"
    assert parameters(ds_to_universal.main) == ["args"]
    assert isinstance(argparse.Namespace(**{k: None for k in passed}), argparse.Namespace)


def test_pipeline_parallel_group_pipeline_stage_of_and_pipeline_layers():
    """A PipelineModule keeps its topology grid in `_grid` (the PipelineEngine takes it as `grid`), whose
    `pipe_parallel_size` and `get_pipe_parallel_group()` give one process per stage; the module knows its `stage_id`
    and `_topo`; it registers each layer it builds under the layer's index in the whole list (`str(layer_idx)`), the
    numbering BeamLoRA's whole-model order reads."""
    from deepspeed.runtime.pipe import engine, module, topology

    assert "self.grid = self.module._grid" in source_of(engine.PipelineEngine.__init__)
    built = source_of(module.PipelineModule)
    assert "self._grid = PipelineParallelGrid(" in built and "self.stage_id = " in built and "self._topo = " in built
    assert "self.add_module(name, module)" in built and "name = str(layer_idx)" in built
    assert "self.pipe_parallel_size = " in source_of(topology.PipelineParallelGrid.__init__)
    assert parameters(topology.PipelineParallelGrid.get_pipe_parallel_group) == ["self"]
    assert "layer.load_state_dict(checkpoint, strict=strict)" in source_of(module.PipelineModule.load_state_dir)
    # pipeline_layers: what load_state_dir loads one by one is forward_funcs, a tied layer's shared module included
    assert "self.forward_funcs.append(self.tied_modules[layer.key])" in built
    assert "for idx, layer in enumerate(self.forward_funcs):" in source_of(module.PipelineModule.load_state_dir)
