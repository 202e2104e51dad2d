"""Loading the base model to fine-tune: from the hub, a folder or the built-in defaults (models.py, builtin.py),
partitioned at load under ZeRO-3, or in 4-bit NF4 (four_bit_*.py), one process per node at a time where a model
cannot be partitioned while it loads (staggered.py)."""
