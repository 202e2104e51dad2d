"""BeamLoRA for DeepSpeed-scale fine-tuning: adaptive-rank LoRA that prunes weak ranks and refills them."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BeamLoRAConfig, ConfigError
from .export import save_adapter
from .merge import merge_adapter, save_merged
from .controller import BeamController
from .inject import apply, find_beamlora_modules, optimizer_param_groups
from . import quant
from .layer import BeamLoRALinear
from .quant import QuantizationError, check_4bit_request, load_4bit_model, prepare_4bit_model
from .zero_access import persistence_threshold_for
from .autotp import autotp_size, prepare_tensor_parallel, tensor_parallel_problem

__all__ = ["BeamLoRAConfig", "ConfigError", "BeamController", "BeamLoRALinear", "apply", "find_beamlora_modules",
           "optimizer_param_groups", "save_checkpoint", "load_checkpoint", "persistence_threshold_for", "save_adapter", "merge_adapter", "save_merged",
           "quant", "QuantizationError", "check_4bit_request", "load_4bit_model", "prepare_4bit_model",
           "autotp_size", "prepare_tensor_parallel", "tensor_parallel_problem"]
__version__ = "0.1.0"
