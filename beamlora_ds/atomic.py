"""Crash-safe file system moves: a reader sees the old folder or the complete new one, never a mix.

A SIGKILL, a preemption or a full disk can stop a writer anywhere. So every folder we publish (adapters,
checkpoint tags) is filled under a temporary name, flushed to disk, and renamed into place; pointer files
(`latest`) are replaced by rename too. POSIX rename is atomic on one file system.
"""
from __future__ import annotations

import os
import shutil
import tempfile


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder`, then the folders themselves, so a rename publishes data that is on disk
    (a process crash loses nothing written, but a node crash can lose what is still only in the page cache)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(os.path.join(root, name), os.O_RDONLY)
        _fsync_path(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_path(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and folders on some platforms) cannot be fsynced: best effort
        pass
    finally:
        os.close(fd)


def write_text_atomically(path: str, text: str) -> None:
    """Replace the file at `path` with `text`: readers see the old content or the new, never a truncated file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def replace_dir(tmp: str, out_dir: str) -> None:
    """Rename the finished folder `tmp` to `out_dir`, replacing an existing `out_dir` (moved aside first, put back
    if the rename fails, deleted after). Both must be on one file system."""
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        return
    parent, base = os.path.split(os.path.abspath(out_dir))
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(old)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
