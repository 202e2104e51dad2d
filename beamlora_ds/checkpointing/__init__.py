"""Checkpoints that resume exactly: save and load with the BeamLoRA state beside DeepSpeed's, published crash-safely
(atomic.py), verified against a manifest before loading, resumable on another number of processes (reshard.py)."""
