"""BeamLoRA for DeepSpeed-scale fine-tuning: adaptive-rank LoRA that prunes weak ranks and refills them.

The public API: what the documentation and the examples use. Everything else is reached through these names, and
the package's folders (method/, backends/, checkpointing/, export/, loading/, integrations/, telemetry/, train/)
say how it is built (docs/architecture.md).
"""
from .adapt import apply
from .backends.deepspeed.autotp import prepare_tensor_parallel
from .backends.deepspeed.supported_setups import UnsupportedSetupError, check_deepspeed_setup
from .backends.deepspeed.zero_params import persistence_threshold_for
from .backends.megatron.hf_llama import gpt_from_hf as megatron_gpt_from_hf
from .backends.megatron.optimizer_setup import megatron_optimizer_overrides
from .checkpointing.layout import CheckpointDamagedError, CheckpointWriteError
from .checkpointing.load import load_checkpoint
from .checkpointing.megatron import load_megatron_checkpoint, save_megatron_checkpoint
from .checkpointing.save import save_checkpoint
from .export.from_checkpoint import export_checkpoint
from .export.live import save_adapter
from .export.megatron import save_megatron_adapter
from .export.megatron_checkpoint import export_megatron_checkpoint
from .export.merge import merge_adapter, save_merged
from .loading.four_bit_load import load_4bit_model, prepare_4bit_model
from .loading.four_bit_request import QuantizationError, check_4bit_request
from .loading.models import load_builtin_model
from .method.config import BeamLoRAConfig, ConfigError
from .method.controller import BeamController
from .method.inject import check_targets, find_beamlora_modules, optimizer_param_groups
from .method.layer import BeamLoRALinear, is_wrappable
from .method.targets import RECOMMENDED_TARGETS
from .telemetry.reset_log import current_records, log_reset

__version__ = "0.1.0"

# The Trainer integration imports transformers' Trainer machinery: loaded on first use, not by `import beamlora_ds`.
_TRAINER_NAMES = ("attach", "BeamLoRATrainerMixin", "BeamLoRACallback")

__all__ = ["BeamController", "BeamLoRAConfig", "BeamLoRALinear", "BeamLoRATrainerMixin", "BeamLoRACallback",
           "CheckpointDamagedError", "CheckpointWriteError", "ConfigError", "QuantizationError",
           "RECOMMENDED_TARGETS", "UnsupportedSetupError", "apply", "attach", "check_4bit_request", "check_deepspeed_setup",
           "check_targets",
           "current_records", "export_checkpoint", "export_megatron_checkpoint", "find_beamlora_modules", "is_wrappable", "load_4bit_model",
           "load_builtin_model", "load_checkpoint", "load_megatron_checkpoint", "log_reset", "megatron_gpt_from_hf",
           "megatron_optimizer_overrides", "merge_adapter", "optimizer_param_groups", "persistence_threshold_for",
           "prepare_4bit_model", "prepare_tensor_parallel", "save_adapter", "save_checkpoint",
           "save_megatron_adapter", "save_megatron_checkpoint", "save_merged"]


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from .integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module 'beamlora_ds' has no attribute {name!r}")
