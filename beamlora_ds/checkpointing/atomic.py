"""Crash-safe file system moves: a reader sees the old folder or the complete new one, never a mix.

A SIGKILL, a preemption or a full disk can stop a writer anywhere. So every folder we publish (adapters,
merged models, checkpoint tags) is filled under a temporary name, flushed to disk, and renamed into place;
pointer files (`latest`) are replaced by rename too. POSIX rename is atomic on one file system. And nothing a
user had is replaced unless asked (`overwrite`), nor anything that does not look like what we write.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import Iterator, Optional

from ..testing.failpoints import kill_point

PARTIAL = ".partial"  # suffix of a checkpoint folder still being written (save.save_checkpoint)


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
    """The process's umask, read without changing it: mkdtemp makes 0700 folders, a published one gets the
    mode any new folder would."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def out_dir_problem(out_dir: str, overwrite: bool) -> Optional[str]:
    """Why `out_dir` must not be written (None when it may): never clobber a folder unasked, nor a non-folder."""
    if not os.path.lexists(out_dir):
        return None
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        return f"{out_dir!r} exists and is not a folder; choose another output path."
    entries = os.listdir(out_dir)
    if not entries:
        return None
    if not overwrite:
        return (f"{out_dir!r} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it, "
                "or choose a new folder.")
    folders = sorted(e for e in entries if os.path.isdir(os.path.join(out_dir, e)))
    if folders:
        return (f"{out_dir!r} holds folders ({folders[:3]}): overwrite replaces the whole folder, and an adapter "
                "or merged-model folder has none, so this looks like something else (a run or checkpoint folder). "
                "Choose another output folder.")
    return None


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary sibling of `out_dir` to fill; on success rename it into place (replacing the old folder
    when `overwrite`), on error delete it. Readers see the old folder or the complete new one, never a mix."""
    problem = out_dir_problem(out_dir, overwrite)
    if problem:
        raise FileExistsError(problem)
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(base)}.partial-*")):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        fsync_tree(tmp)
        kill_point("adapter")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
