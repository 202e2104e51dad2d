"""What launch/train.py is made of: its input checks, the DeepSpeed config's "auto" values, joining the processes,
the data, the engine and its optimizer step, the learning-rate schedule, the run's log and the exact-match
evaluation. Used by launch/train.py and the benchmarks that train the same way; not part of the library's API."""
