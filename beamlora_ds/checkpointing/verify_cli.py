"""`beamlora-verify CKPT_FOLDER...`: check checkpoint tag folders against their manifest.json by hand (after copying
them to another file system, say); prints ok or damaged for each, exit status 1 if any is damaged."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .manifest import verify


def main(argv: Optional[List[str]] = None) -> int:
    """Check checkpoint folders (e.g. after copying them to another file system); 1 when any is damaged."""
    parser = argparse.ArgumentParser(prog="beamlora-verify",
                                     description="Check checkpoint tag folders against their manifest.json.")
    parser.add_argument("folders", nargs="+", metavar="CKPT_FOLDER", help="a checkpoint tag folder")
    args = parser.parse_args(argv)
    damaged = 0
    for folder in args.folders:
        problem = verify(folder)
        if problem is None:
            print(f"ok {folder}")
        else:
            damaged += 1
            print(f"damaged {folder}: {problem}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
