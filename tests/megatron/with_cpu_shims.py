"""Run a script (launch/train_megatron.py, examples/train_megatron.py) with the test-only CPU shims installed first:
    python with_cpu_shims.py SCRIPT ARGS...
Megatron's GPU seeding (model_parallel_cuda_manual_seed) becomes the CPU RNG tracker (shim C)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_shims  # noqa: E402  (first: before megatron builds anything)
import megatron.core.tensor_parallel as megatron_tensor_parallel  # noqa: E402
import megatron.core.tensor_parallel.random as megatron_random  # noqa: E402


def cpu_seed(seed, *args, **kwargs):
    import torch

    torch.manual_seed(seed)
    cpu_shims.init_rng()


megatron_tensor_parallel.model_parallel_cuda_manual_seed = cpu_seed
megatron_random.model_parallel_cuda_manual_seed = cpu_seed

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's; torchrun passes none
    script, sys.argv = args[0], args
    runpy.run_path(script, run_name="__main__")
