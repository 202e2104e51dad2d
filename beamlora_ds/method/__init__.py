"""The method: BeamLoRA itself, pure torch. The settings, the algorithm's decisions, the adapted layer and its score
table, finding and wrapping target layers, and the controller that runs the schedule through the seam to a
training platform. Nothing here imports DeepSpeed or torch.distributed, nor any part of beamlora_ds outside
`method/` but the crash points of `testing/failpoints.py` (standard library only)."""
