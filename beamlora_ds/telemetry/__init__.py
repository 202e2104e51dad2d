"""What a run tells about its resets: the records of log.jsonl (reset_log.py), the rank reallocation they add up to
(allocation.py), and the `beamlora-plot` picture of it (plot.py)."""
