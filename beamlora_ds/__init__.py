"""BeamLoRA for DeepSpeed-scale fine-tuning: adaptive-rank LoRA that prunes weak ranks and refills them."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import BeamLoRAConfig, ConfigError
from .export import merge_adapter, save_adapter, save_merged
from .controller import BeamController
from .inject import apply, find_beamlora_modules, optimizer_param_groups
from .layer import BeamLoRALinear
from .zero_access import persistence_threshold_for

__all__ = ["BeamLoRAConfig", "ConfigError", "BeamController", "BeamLoRALinear", "apply", "find_beamlora_modules",
           "optimizer_param_groups", "save_checkpoint", "load_checkpoint", "persistence_threshold_for", "save_adapter", "merge_adapter", "save_merged"]
__version__ = "0.1.0"
