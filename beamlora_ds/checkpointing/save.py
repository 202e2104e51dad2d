"""save_checkpoint: a DeepSpeed checkpoint that also carries each process's BeamLoRA state, published whole or
not at all.

The controller's snapshot is per process under ZeRO (each keeps its own shard), so the state goes into one file per
data-parallel process beside DeepSpeed's own files (layout.py). DeepSpeed's files hold the trainable state only: the
frozen base is left out (it is loaded from its source on resume; base_identity.py records which one). Every process
writes into `<tag>.partial`; once all have finished, each computes the checksums of its share of the bytes, and the
owner of the folders (folders.py) writes them into the manifest, flushes the folder, renames it to `<tag>` and only
then moves `latest`. A process killed at any moment, or a write that fails (a full disk), leaves `latest`
naming the previous complete checkpoint; the next save clears the leftovers.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from typing import Optional

import torch

from ..method.controller import BeamController
from ..backends import coordination
from ..backends.deepspeed.internals import base_left_out_of_checkpoints, checkpoint_writes_wrapped
from ..testing.failpoints import fail_write_point, kill_point
from . import manifest, reshard
from .base_identity import base_identity
from .atomic import PARTIAL, fsync_tree, replace_dir, write_text_atomically
from .folders import node_local_storage, owns_folders, reading_part, same_folder_as_owner
from .layout import STATE_FILE, CheckpointWriteError, read_latest, validate_tag
from .rng import rng_state

logger = logging.getLogger(__name__)


def save_checkpoint(engine, beam: BeamController, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None, include_base: bool = False) -> str:
    """`engine.save_checkpoint` plus this process's BeamLoRA state, all or nothing; returns the tag. Call on every
    process. A failed write anywhere raises CheckpointWriteError on every process.

    The checkpoint holds what training changes (adapters, their fp32 masters and moments, the BeamLoRA state), not
    the frozen base: a resume loads the base from its source again, and load_checkpoint refuses another base (its
    fingerprint is recorded in the manifest). `include_base=True` writes the base too (DeepSpeed's full checkpoint:
    the model's size in the training dtype more, whole from process 0 under ZeRO 0-2, in fragments under ZeRO-3)."""
    tag = validate_tag(str(tag or f"global_step{engine.global_steps}"))
    problem = beam.step_count_problem(engine)  # a forgotten or extra beam.step() shows here, not silently later
    if problem and coordination.is_process_zero():
        logger.warning("%s", problem)
    base = base_identity(engine.module)  # on every process: a gather under ZeRO-3
    staging, step = tag + PARTIAL, engine.global_steps
    folder = os.path.join(save_dir, staging)
    owner = owns_folders(engine)
    if owner:  # leftovers of saves that were killed half-way, and converted copies of older checkpoints
        os.makedirs(save_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(save_dir), "*" + PARTIAL)):
            shutil.rmtree(stale, ignore_errors=True)
        reshard.remove_universal_copies(save_dir)
    coordination.barrier()
    failed: list = []  # this process's first failed write: OSError, or torch.save's RuntimeError on a full disk
    with _failure_recorded(failed):
        os.makedirs(folder, exist_ok=True)
        fail_write_point("state", step)
        torch.save({"beamlora": beam.state_dict(), "rng": rng_state()},
                   os.path.join(folder, STATE_FILE.format(rank=coordination.rank())))
    kill_point("checkpoint", step)
    without_base = contextlib.nullcontext() if include_base else base_left_out_of_checkpoints(engine)
    with _failure_recorded(failed), checkpoint_writes_wrapped(engine, _recording_writes(step, failed)), without_base:
        # DeepSpeed's save ends in a barrier: after it, every process has written its part of the staging folder
        engine.save_checkpoint(save_dir, tag=staging, client_state=client_state or {}, save_latest=False)
    problem = coordination.first_problem(_failure_message(failed))  # every process learns of a failure anywhere
    if problem is None:
        entries = _checksums_in_shares(engine, folder, failed)
        problem = coordination.first_problem(_failure_message(failed))
    if problem is None:
        if owner:
            with _failure_recorded(failed):
                _publish(engine, save_dir, folder, tag, step, dict(base, included=include_base), entries)
        problem = coordination.first_problem(_failure_message(failed))  # also the closing barrier
    if problem:  # a full disk, a quota, a vanished mount: say what is safe, free what we wrote
        if owner:
            shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointWriteError(
            f"Could not write checkpoint {tag!r} (step {step}) to {save_dir!r}: {problem}. The previous checkpoint "
            f"and 'latest' ({read_latest(save_dir) or 'none yet'}) are untouched; free space or fix the file "
            "system, then continue with --resume.")
    return tag


def _checksums_in_shares(engine, folder: str, failed: list) -> dict:
    """The manifest's checksums, each process reading about its share of the bytes (manifest.share) of the folder
    it writes into. The shares split one listing, the publisher's, handed to every process (a file system whose
    listings lag on some node then fails a read, which is reported, instead of leaving a file to nobody); what the
    processes of the publisher's folder computed is merged. On every process: two gathers, whatever happens here.
    With node-local storage the ranks of a node are taken to be consecutive (DeepSpeed's launcher, torchrun)."""
    node_local = node_local_storage(engine)
    mine = same_folder_as_owner(node_local)
    listing = None
    if owns_folders(engine):
        with _failure_recorded(failed):
            listing = manifest.file_sizes(folder)
    listings = {publisher: found for publisher, found in coordination.all_values((mine, listing))
                if found is not None}
    entries: dict = {}
    if mine in listings:  # else the publisher could not list the folder: its failure is reported
        with _failure_recorded(failed):
            entries = manifest.checksum_entries(folder, reading_part(node_local), listings[mine])
    merged: dict = {}
    for publisher, found in coordination.all_values((mine, entries)):
        if publisher == mine:
            merged.update(found)
    return merged


def _publish(engine, save_dir: str, folder: str, tag: str, step: int, base: dict, entries: dict) -> None:
    """The owner's part once every process wrote its files and read its share: manifest, flush, rename into place,
    move `latest`."""
    fail_write_point("manifest", step)
    manifest.write_manifest(folder, tag, step, extra={"world_size": coordination.world_size(),
                                                      "zero_stage": engine.zero_optimization_stage(), "base": base},
                            entries=entries)
    fsync_tree(folder)
    replace_dir(folder, os.path.join(save_dir, tag))
    kill_point("latest", step)
    fail_write_point("latest", step)
    write_text_atomically(os.path.join(save_dir, "latest"), tag)


@contextlib.contextmanager
def _failure_recorded(failed: list):
    """Run a write; a failure is recorded (the first one) instead of raised, so that this process still meets
    the others in the next collective and they all raise together."""
    try:
        yield
    except (OSError, RuntimeError, manifest.ManifestError) as e:
        failed.append(e)


def _failure_message(failed: list) -> Optional[str]:
    """This process's first failed write, as the others will read it (None when all went well)."""
    return f"{failed[0]} (on process {coordination.rank()})" if failed else None


def _recording_writes(step: int, failed: list):
    """DeepSpeed's own file writes, recorded like ours: a failed one (and every later one) returns instead of
    raising, so DeepSpeed still reaches its barriers on this process. BEAMLORA_DS_FAIL_WRITE_AT's `deepspeed`
    point makes them fail here (the disk-full tests)."""
    def wrap(save):
        def recorded_save(state_dict, path, *args, **kwargs):
            if not failed:
                with _failure_recorded(failed):
                    fail_write_point("deepspeed", step)
                    return save(state_dict, path, *args, **kwargs)
            return None
        return recorded_save
    return wrap
