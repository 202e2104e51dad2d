"""Getting the trained adapter out: a stock peft adapter with the score folded in (adapter_format.py), from a live
model or engine (live.py), from DeepSpeed checkpoints offline (from_checkpoint.py) or a Trainer run's folders
(from_trainer.py), merged into the base weights (merge.py), and the `beamlora-export` command (cli.py)."""
