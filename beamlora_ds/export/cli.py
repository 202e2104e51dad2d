"""`beamlora-export CHECKPOINT_DIR OUT_DIR [--merge --base_model PATH]`: from_checkpoint.py on the command line.

Bad input (an existing folder, a missing checkpoint or tag) is one error line and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from .from_checkpoint import export_checkpoint

logger = logging.getLogger(__name__)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="beamlora-export",
        description="Turn a BeamLoRA checkpoint (a DeepSpeed one of any ZeRO stage, or a HF Trainer run's; no GPUs or "
                    "distributed job needed) into a stock PEFT LoRA adapter (score folded into A), or with --merge "
                    "into a merged model.")
    p.add_argument("checkpoint_dir", help="folder given to beamlora_ds.save_checkpoint (holds 'latest' and tags), or "
                                          "a Trainer output_dir (its checkpoint-N folders) or one checkpoint-N")
    p.add_argument("out_dir", help="new folder for the adapter (or the merged model)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step100 or checkpoint-100 (default: the 'latest' file; "
                                                    "for a Trainer run the highest checkpoint-N)")
    p.add_argument("--merge", action="store_true", help="write a merged full model instead of an adapter")
    p.add_argument("--base_model", default=None,
                   help="base model path or name: needed by --merge; otherwise recorded in adapter_config.json")
    p.add_argument("--task_type", default="CAUSAL_LM",
                   help="peft task_type for adapter_config.json ('none' for a plain PeftModel); default CAUSAL_LM")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists and is not empty")
    args = p.parse_args(argv)
    if args.merge and not args.base_model:
        p.error("--merge needs --base_model PATH (the base weights are not in the checkpoint)")
    if args.task_type.lower() == "none":
        args.task_type = None
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Export; print the output folder's absolute path and return 0, or log why not and return 2."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_checkpoint(args.checkpoint_dir, args.out_dir, tag=args.tag, base_model=args.base_model,
                          merge=args.merge, overwrite=args.overwrite, task_type=args.task_type)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    print(os.path.abspath(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
