"""What a training run tells its user: a progress bar (loss, lr, tokens/s, ETA), a line per event, and log.jsonl.

Rank 0 writes; every other process's RunLog does nothing, so callers need no rank checks. The records are read
back by `beamlora_ds.current_records` (a `resume` record supersedes what an interrupted run logged after it).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

from ..telemetry.reset_log import reset_log_record


class RunLog:
    """log.jsonl in `output_dir` plus the progress bar, on rank 0 only."""

    def __init__(self, output_dir: str, rank: int, total_steps: int, start_step: int):
        self.active = rank == 0
        self.path = os.path.join(output_dir, "log.jsonl")
        self.bar = None
        if self.active:
            from tqdm.auto import tqdm

            interactive = sys.stdout.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="BeamLoRA", dynamic_ncols=True,
                            file=sys.stdout, mininterval=0.1 if interactive else 10.0)

    def write(self, record: dict, line: Optional[str] = None) -> None:
        """Append `record` to log.jsonl; print `line` (if any) above the progress bar."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if line:
            self.bar.write(line)

    def progress(self, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.active:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.active:
            self.bar.close()

    def reset(self, record: dict) -> None:
        """A BeamController reset record, encoded as `beamlora_ds.log_reset` writes it from a user's own loop."""
        self.write(reset_log_record(record),
                   f"reset at step {record['step']}: keep-fraction {record['keep_fraction']:.4f}, "
                   f"{len(record['pruned'])} ranks pruned in {len({n for n, _ in record['pruned']})} modules"
                   + (f" (skipped: {record['skipped']})" if record.get("skipped") else ""))

    def nonfinite_loss(self, step: int, loss: float, step_applied: bool) -> None:
        self.write({"type": "nonfinite_loss", "step": step, "loss": str(loss),
                    "skipped_by_deepspeed": not step_applied},
                   f"non-finite loss ({loss}) at step {step}: "
                   + ("DeepSpeed skipped the update (fp16 overflow)" if not step_applied
                      else "the next BeamLoRA reset will be skipped"))


# loggers launch/train.py quiets to warnings (tests that run the entry in-process restore them)
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "beamlora_ds.method.controller")


def configure_logging() -> None:
    """launch/train.py's logging: INFO on process 0, warnings elsewhere; resets get their own progress line."""
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)  # resets get their own line in the progress output
