"""What megatron-core 0.16.1 needs to run on a CPU with gloo: TEST PROCESSES ONLY (docs/platform.md, "megatron-core").

On GPUs none of this is needed and the library never does it. Import this module first in a test process, before
megatron.core builds anything; call `init_rng()` after `parallel_state.initialize_model_parallel`.

- A: `torch.cuda.current_device()` returns the CPU device (many megatron call sites build buffers there);
- B: `device="cuda"` in torch's factory functions becomes the CPU (hard-coded in the pipeline schedules, the
  optimizers and clip_grads);
- C: a CPU RNG tracker (`init_rng`), which building a GPTModel needs;
- D: `Tensor.type()` without arguments reports `torch.cuda.*Tensor` for CPU tensors (the Megatron optimizers assert
  their parameters are CUDA tensors);
- E: `local_spec_allowing_sequence_parallel()`: the local layer spec falls back to torch norms, which refuse sequence
  parallelism (Apex or Transformer Engine provide the sequence-parallel norms on GPUs); this spec's torch norms
  allow it, their weights marked `sequence_parallel` as Megatron's own norms are;
- F: `torch.cuda.synchronize()` does nothing (the pipeline's batched p2p calls it after every exchange unless
  TransformerConfig(batch_p2p_sync=False); launch/train_megatron.py keeps Megatron's default, right on GPUs).
"""
import torch

torch.cuda.current_device = lambda: torch.device("cpu")  # A
torch.cuda.synchronize = lambda device=None: None  # F


def _cpu_instead_of_cuda(factory):
    def factory_on_cpu(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    factory_on_cpu.__wrapped__ = factory
    return factory_on_cpu


for _name in ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like"):  # B
    setattr(torch, _name, _cpu_instead_of_cuda(getattr(torch, _name)))

_tensor_type = torch.Tensor.type


def _type_as_on_cuda(self, *args, **kwargs):  # D
    result = _tensor_type(self, *args, **kwargs)
    if not args and not kwargs and isinstance(result, str) and not self.is_cuda:
        return result.replace("torch.", "torch.cuda.", 1)
    return result


torch.Tensor.type = _type_as_on_cuda


def init_rng() -> None:
    """C: megatron's RNG tracker on the CPU (call after initialize_model_parallel)."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


class SequenceParallelTorchNorm:
    """E: torch's LayerNorm / RMSNorm as megatron's local spec builds them, without the refusal of sequence
    parallelism (a norm works per token; Megatron sums the gradients of weights marked `sequence_parallel`)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def local_spec_allowing_sequence_parallel(num_layers: int, **spec_kwargs):
    """E: the block spec GPTModel takes as `transformer_layer_spec`: the local layer spec with the norms above."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = copy.deepcopy(get_gpt_layer_local_spec(**spec_kwargs))
    layer.submodules.input_layernorm = SequenceParallelTorchNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelTorchNorm)
