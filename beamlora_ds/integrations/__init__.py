"""BeamLoRA inside other trainers: the Hugging Face Trainer (hf_trainer.py)."""
