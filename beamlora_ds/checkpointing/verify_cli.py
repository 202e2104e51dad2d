"""`beamlora-verify FOLDER...`: check checkpoints against their manifest.json by hand (after copying them to another
file system, say). A FOLDER is a checkpoint tag folder, a folder of them (`OUTPUT/checkpoints`) or a run's output
folder (its `checkpoints/`): every checkpoint found is checked. Prints ok or damaged for each; exit status 1 if any
is damaged or nothing could be checked."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

from .atomic import PARTIAL
from .manifest import MANIFEST, ManifestError, checkpoint_tags, read_manifest, verify

CHECKPOINTS = "checkpoints"  # where launch/train.py keeps a run's checkpoints


def main(argv: Optional[List[str]] = None) -> int:
    """Check checkpoints (e.g. after copying them to another file system); 1 when any is damaged."""
    parser = argparse.ArgumentParser(prog="beamlora-verify",
                                     description="Check checkpoints against their manifest.json: a checkpoint tag "
                                                 "folder, a folder of them, or a run's output folder.")
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="a checkpoint tag folder (OUTPUT/checkpoints/global_stepN), OUTPUT/checkpoints or OUTPUT")
    args = parser.parse_args(argv)
    bad = 0
    for folder in args.folders:
        for status, path, problem in check(folder):
            bad += status != "ok"
            print(f"{status} {path}" + (f": {problem}" if problem else ""))
    return 1 if bad else 0


def check(folder: str) -> List[Tuple[str, str, Optional[str]]]:
    """(ok | damaged | unchecked, path, problem) for `folder` as a tag folder, or for every checkpoint in it."""
    if os.path.isdir(folder) and not has_manifest(folder) and holds_checkpoints(folder):
        ckpt_dir = folder if checkpoint_tags(folder) or unchecked(folder) else os.path.join(folder, CHECKPOINTS)
        found = []
        for tag in checkpoint_tags(ckpt_dir):
            problem = verify(os.path.join(ckpt_dir, tag))
            found.append(("ok" if problem is None else "damaged", os.path.join(ckpt_dir, tag), problem))
        return found + [("unchecked", os.path.join(ckpt_dir, name), f"no {MANIFEST}: not written, or not finished, "
                         "by beamlora_ds.save_checkpoint, so it can be neither checked nor resumed from")
                        for name in unchecked(ckpt_dir)]
    problem = verify(folder)  # a tag folder (or what should be one): its own verdict and advice
    if problem is not None and os.path.isdir(folder) and not has_manifest(folder) and not looks_like_tag(folder):
        problem = (f"{folder!r} is not a checkpoint (no {MANIFEST}) and holds none: point beamlora-verify at a "
                   f"checkpoint tag folder (OUTPUT/{CHECKPOINTS}/global_stepN), at OUTPUT/{CHECKPOINTS}, or at a run's "
                   "output folder.")
    return [("ok" if problem is None else "damaged", folder, problem)]


def looks_like_tag(folder: str) -> bool:
    """A checkpoint tag folder by its files (DeepSpeed's model states, BeamLoRA's state), manifest or not."""
    return any(n.endswith("model_states.pt") or n.startswith("beamlora_state_rank") for n in os.listdir(folder))


def has_manifest(folder: str) -> bool:
    try:
        return read_manifest(folder) is not None
    except ManifestError:
        return True  # a manifest that cannot be read: verify() says so


def unchecked(ckpt_dir: str) -> List[str]:
    """Tag-like folders without a manifest in a folder of checkpoints (not `latest`, `*.partial` or hidden ones)."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    return sorted(n for n in names if n.startswith("global_step") and os.path.isdir(os.path.join(ckpt_dir, n))
                  and not n.endswith(PARTIAL) and not has_manifest(os.path.join(ckpt_dir, n)))


def holds_checkpoints(folder: str) -> bool:
    """Whether `folder` is a folder of checkpoints or a run folder with one."""
    return any(checkpoint_tags(d) or unchecked(d) for d in (folder, os.path.join(folder, CHECKPOINTS)))


if __name__ == "__main__":
    sys.exit(main())
