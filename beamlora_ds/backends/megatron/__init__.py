"""BeamLoRA on megatron-core: its parallel linear layers (tensor and sequence parallelism, fused qkv and fc1) and
its optimizers (the plain Megatron optimizer and the DistributedOptimizer). megatron-core is imported inside
functions only: importing this package does not need it (docs/megatron.md)."""
