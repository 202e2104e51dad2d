"""The DeepSpeed backend: ZeRO 0-3 access, AutoTP tensor parallelism, reading DeepSpeed configs, which setups
BeamLoRA supports, and (internals.py) every private DeepSpeed name relied on."""
