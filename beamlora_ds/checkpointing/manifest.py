"""Integrity manifests for checkpoint folders: find a damaged checkpoint before resuming from it.

A checkpoint copied between file systems, or sitting on a disk that flips bits, can come back truncated or corrupt,
and torch.load then fails deep inside DeepSpeed with a message that names no file (or, worse, loads garbage). So
each published tag folder carries `manifest.json`: the size and a checksum of every file, written before the folder
is renamed into place. `verify` compares them, cheap sizes first; `newest_intact` picks what to resume from.

Which checksum: DeepSpeed's files are large (the optimizer states of a big model), so they get crc32, fast and
enough (with the size) to find a flipped byte or a truncation. Everything else, our `beamlora_state_rank{N}.pt`
and any file we do not know, is small and gets sha256. The rule, `_is_deepspeeds`: a top-level file whose name
ends in `_model_states.pt` or `_optim_states.pt` (mp_rank_*, zero_pp_rank_*, bf16_zero_pp_rank_*, layer_*, expert
files), or any file in a sub-folder (only DeepSpeed makes those, e.g. `offloaded_tensors/`). The manifest records
which algorithm each file got, so verify never needs the rule and a manifest stays readable if the rule changes.

The `beamlora-verify` command (verify_cli.py) checks folders by hand.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import zlib
from typing import Callable, Dict, List, Optional, Tuple

from .atomic import PARTIAL, write_text_atomically

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 4 << 20  # 4 MiB reads: large enough that the hash, not the system calls, sets the speed
DEEPSPEED_SUFFIXES = ("_model_states.pt", "_optim_states.pt")
WHAT_TO_DO = ("resume from an earlier checkpoint (--resume auto picks the newest intact one), or delete this folder "
              "(or copy it again from its source)")


class ManifestError(ValueError):
    """A manifest.json that cannot be read: the folder cannot be checked, so it must not be trusted."""


def _is_deepspeeds(relpath: str) -> bool:
    """Whether DeepSpeed wrote this file (it gets crc32, everything else sha256): see the module docstring."""
    return "/" in relpath or relpath.endswith(DEEPSPEED_SUFFIXES)


def _checksum(path: str, algo: str) -> str:
    """Hex checksum of the file at `path` with `algo` ("sha256" or "crc32"), read in CHUNK pieces."""
    if algo == "crc32":
        crc = 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                crc = zlib.crc32(chunk, crc)
        return f"{crc & 0xFFFFFFFF:08x}"
    if algo != "sha256":
        raise ManifestError(f"unknown checksum {algo!r}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: str) -> List[str]:
    """Relative paths ('/' separators, sorted) of the regular files under `folder`, without the manifest and the
    temporaries of writing it. Links are not followed: we never write them."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel == MANIFEST or rel.startswith(MANIFEST + ".tmp-"):
                continue
            if stat.S_ISREG(os.lstat(os.path.join(root, name)).st_mode):
                found.append(rel)
    return sorted(found)


def share(sizes: Dict[str, int], part: Tuple[int, int]) -> List[str]:
    """The files whose checksums process part[0] of part[1] computes: largest first, each to the process with the
    fewest bytes so far (ties by name), so each reads about 1/part[1] of the bytes, never one process all of them.
    Depends only on the names and sizes, so every process computes the same split."""
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part={part!r}: want (i, n) with 0 <= i < n")
    load, mine = [0] * count, []
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        reader = min(range(count), key=lambda k: (load[k], k))
        load[reader] += sizes[rel]
        if reader == index:
            mine.append(rel)
    return sorted(mine)


def file_sizes(folder: str) -> Dict[str, int]:
    """{relative path: size} of the files a manifest of `folder` lists."""
    return {rel: os.path.getsize(os.path.join(folder, *rel.split("/"))) for rel in _files(folder)}


def checksum_entries(folder: str, part: Tuple[int, int] = (0, 1), sizes: Optional[Dict[str, int]] = None
                     ) -> Dict[str, dict]:
    """{relative path: {"size", algorithm: checksum}} for this process's share (`share`) of the files in `folder`;
    the shares of all part[1] processes together cover every file once when they split the same listing: `sizes`
    (file_sizes as one process saw it, handed to all; by default this process's own listing)."""
    sizes = file_sizes(folder) if sizes is None else sizes
    entries = {}
    for rel in share(sizes, part):
        algo = "crc32" if _is_deepspeeds(rel) else "sha256"
        entries[rel] = {"size": sizes[rel], algo: _checksum(os.path.join(folder, *rel.split("/")), algo)}
    return entries


def write_manifest(folder: str, tag: str, step: int, extra: Optional[dict] = None,
                   entries: Optional[Dict[str, dict]] = None) -> dict:
    """Record size and checksum of every file in `folder` in `folder/manifest.json` (atomically: a crash leaves no
    half manifest); returns what was written. Call once every process has written its files, before the rename.
    `entries`: the checksums the processes computed in shares (checksum_entries), merged; every file in the folder
    must be among them. Without them this process reads every file."""
    files = checksum_entries(folder) if entries is None else dict(entries)
    unlisted = sorted(set(_files(folder)) - set(files))
    if unlisted:
        raise ManifestError(f"{folder}: no checksum was computed for {unlisted[:3]} (written after the shares were "
                            "read?)")
    manifest = {"format": FORMAT, "tag": tag, "step": int(step), "written_at": time.time(), "files": files}
    if extra:
        manifest["extra"] = dict(extra)
    write_text_atomically(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: str) -> Optional[dict]:
    """The manifest of `folder`, None when it has none; ManifestError when it is there but unreadable."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} cannot be read ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path} is not a checkpoint manifest (no 'files' table)")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} has format {manifest.get('format')!r}; this beamlora_ds reads format {FORMAT} "
                            "(a newer beamlora_ds wrote it?)")
    if not isinstance(manifest.get("step"), int):
        raise ManifestError(f"{path} has no integer 'step'")
    for rel, entry in manifest["files"].items():
        parts = rel.split("/")
        if ".." in parts or "" in parts:  # absolute, or climbing out: it must name a file inside the folder
            raise ManifestError(f"{path} lists {rel!r}, which is not a path inside the folder")
        ok = isinstance(entry, dict) and isinstance(entry.get("size"), int) and bool({"sha256", "crc32"} & set(entry))
        if not ok:
            raise ManifestError(f"{path} has no size and checksum for {rel!r}")
    return manifest


def verify(folder: str, part: Tuple[int, int] = (0, 1), only: Optional[Callable[[str], bool]] = None
           ) -> Optional[str]:
    """None when `folder` matches its manifest, else one sentence naming the damaged file and what to do.

    Sizes are checked for every file (cheap, and finds any truncation); checksums only for this process's `share`
    of the files (by their sizes in the manifest), so part[1] processes each read about 1/part[1] of the bytes, and
    of those only the ones `only` accepts. A folder without a manifest is refused: it cannot be checked."""
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part={part!r}: want (i, n) with 0 <= i < n")
    if not os.path.isdir(folder):
        return f"Checkpoint {folder!r} is not a folder (moved or deleted?)."
    try:
        manifest = read_manifest(folder)
    except ManifestError as e:
        return f"Checkpoint {folder!r} cannot be checked: {e}; {WHAT_TO_DO}."
    if manifest is None:
        return (f"Checkpoint {folder!r} has no {MANIFEST}: it was not written (or not finished) by "
                f"beamlora_ds.save_checkpoint, so it cannot be checked; {WHAT_TO_DO}.")
    # Files in the folder but not in the manifest are ignored: DeepSpeed or a user may add files later, and the
    # load reads only the files it names, which are all listed.
    listed = sorted(manifest["files"])
    for rel in listed:
        path = os.path.join(folder, *rel.split("/"))
        want = manifest["files"][rel]["size"]
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return f"Checkpoint {folder!r} is damaged: {rel} is missing; {WHAT_TO_DO}."
        if size != want:
            how = "truncated" if size < want else "extended"
            return (f"Checkpoint {folder!r} is damaged: {rel} has size {size}, the manifest says {want} ({how}); "
                    f"{WHAT_TO_DO}.")
    for rel in share({rel: manifest["files"][rel]["size"] for rel in listed}, part):
        if only is not None and not only(rel):
            continue
        entry = manifest["files"][rel]
        algo = "sha256" if "sha256" in entry else "crc32"
        try:
            actual = _checksum(os.path.join(folder, *rel.split("/")), algo)
        except OSError as e:
            return f"Checkpoint {folder!r} is damaged: {rel} cannot be read ({e}); {WHAT_TO_DO}."
        if actual != entry.get(algo):
            return (f"Checkpoint {folder!r} is damaged: {rel} has another {algo} than the manifest (corrupted); "
                    f"{WHAT_TO_DO}.")
    return None


def checkpoint_tags(ckpt_dir: str) -> List[str]:
    """Published checkpoint folders in `ckpt_dir` that have a manifest, newest first (by the manifest's step, then
    written_at). Skipped: `*.partial` (still being written), hidden folders (atomic.replace_dir's `.<tag>.old-*`
    leftovers), `latest`. A folder whose manifest cannot be read comes first, so newest_intact reports it."""
    keyed = []
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        folder = os.path.join(ckpt_dir, name)
        if name == "latest" or name.endswith(PARTIAL) or name.startswith(".") or not os.path.isdir(folder):
            continue
        try:
            manifest = read_manifest(folder)
        except ManifestError:
            keyed.append(((float("inf"), float("inf")), name))
            continue
        if manifest is not None:
            keyed.append(((manifest["step"], float(manifest.get("written_at", 0))), name))
    return [name for _, name in sorted(keyed, reverse=True)]


def newest_intact(ckpt_dir: str, verify_fn: Callable[[str], Optional[str]] = verify
                  ) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest tag in `ckpt_dir` that `verify_fn` finds intact (None if none), and the (tag, problem) pairs of
    the newer ones it skipped, for the caller to log."""
    skipped = []
    for tag in checkpoint_tags(ckpt_dir):
        problem = verify_fn(os.path.join(ckpt_dir, tag))
        if problem is None:
            return tag, skipped
        skipped.append((tag, problem))
    return None, skipped
