"""Checkpoint manifests (manifest.py): a truncated, corrupted or missing file in a checkpoint is found and named
before a resume loads it, and the newest intact checkpoint is found past damaged ones."""
import hashlib
import json
import os
import shutil
import runpy
import sys
import zlib

import pytest
import torch

from beamlora_ds.checkpointing import manifest as mf, verify_cli
from beamlora_ds.checkpointing.manifest import (MANIFEST, ManifestError, checkpoint_tags, newest_intact, read_manifest, verify, write_manifest)
from helpers import flip_middle_byte, truncate_last_byte

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
OURS = "beamlora_state_rank0.pt"
SUB = "offloaded_tensors/rank0/state.swp"  # DeepSpeed's NVMe offload copies land in sub-folders
FILES = [MODEL, OPTIM, "zero_pp_rank_1_mp_rank_00_optim_states.pt", OURS, "beamlora_state_rank1.pt", SUB]


def make_checkpoint(folder, step=10, seed=0):
    """A tag folder with files named like DeepSpeed's and ours (torch.save of random tensors), and its manifest."""
    gen = torch.Generator().manual_seed(seed)
    for i, rel in enumerate(FILES):
        path = os.path.join(folder, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"t": torch.randn(64 + 16 * i, generator=gen)}, path)
    return write_manifest(str(folder), os.path.basename(folder), step, extra={"world_size": 2})


def test_write_manifest_records_every_file_with_the_checksum_of_its_kind(tmp_path):
    folder = tmp_path / "global_step10"
    folder.mkdir()
    (folder / "notes.txt").write_text("a file of unknown origin")  # not DeepSpeed's by the rule: sha256
    written = make_checkpoint(str(folder))
    assert read_manifest(str(folder)) == written
    assert written["format"] == 1 and written["tag"] == "global_step10" and written["step"] == 10
    assert written["extra"] == {"world_size": 2} and isinstance(written["written_at"], float)
    assert list(written["files"]) == sorted(FILES + ["notes.txt"])  # recursive, '/' separators, no manifest.json
    for rel, entry in written["files"].items():
        data = open(os.path.join(folder, *rel.split("/")), "rb").read()
        assert entry["size"] == len(data)
        if rel.endswith(("_model_states.pt", "_optim_states.pt")) or "/" in rel:
            assert set(entry) == {"size", "crc32"} and entry["crc32"] == f"{zlib.crc32(data):08x}"
        else:
            assert set(entry) == {"size", "sha256"} and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify(str(folder)) is None


def test_a_rewritten_manifest_lists_neither_itself_nor_a_killed_writers_temporary(tmp_path):
    folder = str(tmp_path / "ckpt")
    first = make_checkpoint(folder)
    open(os.path.join(folder, MANIFEST + ".tmp-4242"), "w").write("{half")
    assert list(write_manifest(folder, "ckpt", 10)["files"]) == list(first["files"])


@pytest.mark.parametrize("rel", [MODEL, OPTIM, OURS, SUB])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_flipped_byte_or_a_truncation_is_found_and_the_file_named(tmp_path, rel, damage):
    folder = str(tmp_path / "global_step10")
    make_checkpoint(folder)
    path = os.path.join(folder, *rel.split("/"))
    if damage == "flip":
        flip_middle_byte(path)
    else:
        truncate_last_byte(path)
    problem = verify(folder)
    assert problem is not None and rel in problem
    assert ("corrupted" if damage == "flip" else "truncated") in problem
    assert "earlier checkpoint" in problem  # says what to do


def extend_by_a_byte(path):
    with open(path, "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize("rel, damage, word", [(OURS, extend_by_a_byte, "extended"), (OPTIM, os.remove, "missing")])
def test_an_extended_or_missing_file_is_found(tmp_path, rel, damage, word):
    folder = str(tmp_path / "ckpt")
    make_checkpoint(folder)
    damage(os.path.join(folder, rel))
    problem = verify(folder)
    assert rel in problem and word in problem


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    folder = str(tmp_path / "old")
    make_checkpoint(folder)
    os.remove(os.path.join(folder, MANIFEST))
    assert read_manifest(folder) is None
    assert "has no manifest.json: it was not written (or not finished) by beamlora_ds.save_checkpoint" in verify(folder)
    assert "not a folder" in verify(str(tmp_path / "absent"))


def test_an_unreadable_manifest_is_an_error_and_the_folder_is_not_trusted(tmp_path):
    folder = str(tmp_path / "ckpt")
    make_checkpoint(folder)
    path = os.path.join(folder, MANIFEST)
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(folder)
    assert "cannot be checked" in verify(folder)
    bad = json.loads(text)
    bad["files"]["../elsewhere.pt"] = {"size": 1, "sha256": "0"}
    open(path, "w").write(json.dumps(bad))
    with pytest.raises(ManifestError, match="not a path inside"):
        read_manifest(folder)


def test_files_not_in_the_manifest_are_ignored(tmp_path):
    folder = str(tmp_path / "ckpt")
    make_checkpoint(folder)
    (tmp_path / "ckpt" / "added_later.pt").write_bytes(b"anything")
    os.makedirs(os.path.join(folder, "new_sub"))
    (tmp_path / "ckpt" / "new_sub" / "x").write_bytes(b"y")
    assert verify(folder) is None


def test_parts_share_the_hashing_each_file_once_but_all_check_sizes(tmp_path, monkeypatch):
    folder = str(tmp_path / "ckpt")
    make_checkpoint(folder)
    real = mf._checksum
    hashed = []
    monkeypatch.setattr(mf, "_checksum", lambda path, algo: hashed.append(path) or real(path, algo))
    shares = []
    for i in range(2):
        hashed.clear()
        assert verify(folder, part=(i, 2)) is None
        shares.append([os.path.relpath(p, folder).replace(os.sep, "/") for p in hashed])
    assert sorted(shares[0] + shares[1]) == sorted(FILES)  # every file exactly once over the two parts
    assert shares[0] and shares[1]  # and both did some of it
    flip_middle_byte(os.path.join(folder, shares[1][0]))
    found = [verify(folder, part=(i, 2)) for i in range(2)]
    assert found[0] is None and shares[1][0] in found[1]  # corruption: found by the part that hashes the file
    os.truncate(os.path.join(folder, shares[1][0]), 10)
    assert "truncated" in verify(folder, part=(0, 2))  # a size change: found by every part
    with pytest.raises(ValueError):
        verify(folder, part=(2, 2))


def test_shares_balance_the_bytes_not_the_file_count():
    """Each of n processes reads about 1/n of the bytes (at most one file more than an even split), every file once,
    and the split is a function of the names and sizes only (every process computes the same one)."""
    sizes = {f"zero_pp_rank_{i}_optim_states.pt": 100 for i in range(8)}
    sizes.update({f"beamlora_state_rank{i}.pt": 1 for i in range(8)})
    sizes["mp_rank_00_model_states.pt"] = 350  # one large file: its reader takes less of the rest
    total = sum(sizes.values())
    for count in (1, 2, 3, 8):
        shares = [mf.share(sizes, (i, count)) for i in range(count)]
        assert sorted(sum(shares, [])) == sorted(sizes)  # every file exactly once
        loads = [sum(sizes[r] for r in share) for share in shares]
        assert max(loads) <= total / count + max(sizes.values()), (count, loads)  # greedy's bound
        assert mf.share(dict(reversed(list(sizes.items()))), (0, count)) == shares[0]
    # by hand, largest first to the lighter process: 350 | 100 x 4; then the 100s alternate (450 | 500, 550 | 600);
    # the eight 1s all go to the lighter one: 558 | 600
    assert [sum(sizes[r] for r in mf.share(sizes, (i, 2))) for i in range(2)] == [558, 600]


def test_a_manifest_from_shares_equals_one_process_reading_everything(tmp_path):
    folder = str(tmp_path / "ckpt")
    whole = make_checkpoint(folder)
    entries = {}
    for i in range(3):
        entries.update(mf.checksum_entries(folder, (i, 3)))
    from_shares = write_manifest(folder, os.path.basename(folder), 10, extra={"world_size": 2}, entries=entries)
    assert from_shares["files"] == whole["files"]
    with pytest.raises(ManifestError, match="no checksum was computed"):
        write_manifest(folder, "ckpt", 10, entries=mf.checksum_entries(folder, (0, 3)))


def test_shares_split_the_listing_they_are_given(tmp_path):
    """Every process splits the publisher's listing (a lagging listing elsewhere cannot leave a file to nobody); a
    listed file this process cannot see fails loudly instead of being skipped."""
    folder = str(tmp_path / "ckpt")
    make_checkpoint(folder)
    listing = mf.file_sizes(folder)
    assert sorted(listing) == sorted(FILES)
    owner = next(i for i in range(2) if OURS in mf.share(listing, (i, 2)))
    os.remove(os.path.join(folder, OURS))
    assert OURS not in mf.checksum_entries(folder, (1 - owner, 2), listing)  # the other share never reads it
    with pytest.raises(OSError):
        mf.checksum_entries(folder, (owner, 2), listing)


def test_only_limits_which_files_are_hashed(tmp_path):
    folder = str(tmp_path / "ckpt")
    make_checkpoint(folder)
    flip_middle_byte(os.path.join(folder, MODEL))
    assert verify(folder, only=lambda rel: rel.startswith("beamlora_state")) is None
    assert MODEL in verify(folder, only=lambda rel: rel == MODEL)


def set_written_at(folder, when):
    path = os.path.join(folder, MANIFEST)
    data = json.load(open(path))
    data["written_at"] = when
    open(path, "w").write(json.dumps(data))


def test_checkpoint_tags_newest_first_and_only_published_ones(tmp_path):
    d = tmp_path
    make_checkpoint(str(d / "global_step9"), step=9)  # sorts after global_step10 by name: order is by step
    make_checkpoint(str(d / "global_step10"), step=10)
    make_checkpoint(str(d / "again10"), step=10)  # the same step saved twice: the later write is newer
    set_written_at(str(d / "global_step10"), 1000.0)
    set_written_at(str(d / "again10"), 2000.0)
    make_checkpoint(str(d / "global_step20.partial"), step=20)  # still being written
    make_checkpoint(str(d / ".global_step20.old-abc"), step=20)  # replace_dir's leftover
    (d / "no_manifest").mkdir()
    (d / "latest").write_text("global_step10")
    assert checkpoint_tags(str(d)) == ["again10", "global_step10", "global_step9"]
    make_checkpoint(str(d / "broken"), step=1)
    (d / "broken" / MANIFEST).write_text("{")  # unreadable: listed first, so newest_intact reports it
    assert checkpoint_tags(str(d)) == ["broken", "again10", "global_step10", "global_step9"]
    assert checkpoint_tags(str(d / "absent")) == []


def test_newest_intact_skips_damaged_ones_and_says_which(tmp_path):
    d = str(tmp_path)
    for step in (10, 20, 30):
        make_checkpoint(os.path.join(d, f"global_step{step}"), step=step, seed=step)
    assert newest_intact(d) == ("global_step30", [])
    flip_middle_byte(os.path.join(d, "global_step30", OURS))
    os.remove(os.path.join(d, "global_step20", MODEL))
    tag, skipped = newest_intact(d)
    assert tag == "global_step10"
    assert [t for t, _ in skipped] == ["global_step30", "global_step20"]
    assert OURS in skipped[0][1] and MODEL in skipped[1][1]
    seen = []
    assert newest_intact(d, verify_fn=lambda folder: seen.append(folder) or "no") == (
        None, [(f"global_step{s}", "no") for s in (30, 20, 10)])
    assert seen == [os.path.join(d, f"global_step{s}") for s in (30, 20, 10)]


def test_cli_exit_codes(tmp_path, capsys):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    make_checkpoint(good)
    make_checkpoint(bad)
    os.truncate(os.path.join(bad, OURS), 3)
    assert verify_cli.main([good]) == 0
    assert capsys.readouterr().out == f"ok {good}\n"
    assert verify_cli.main([good, bad]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok {good}" and out[1].startswith(f"damaged {bad}: ") and OURS in out[1]
    os.remove(os.path.join(good, MANIFEST))
    assert verify_cli.main([good]) == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: this test file imported the module already
def test_python_dash_m_exits_with_the_code(tmp_path, monkeypatch, capsys):
    bad = str(tmp_path / "bad")
    make_checkpoint(bad)
    os.remove(os.path.join(bad, MODEL))
    monkeypatch.setattr(sys, "argv", ["manifest", bad])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("beamlora_ds.checkpointing.verify_cli", run_name="__main__")
    assert exit_.value.code == 1 and "missing" in capsys.readouterr().out


def test_cli_on_a_run_folder_or_a_checkpoints_folder_checks_every_checkpoint_in_it(tmp_path, capsys):
    """A run's output folder or its checkpoints/ folder: each checkpoint checked and named (one damaged, one
    unfinished), never the advice to delete the folder that holds them; a folder with none says where to point."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    for step in (10, 20):
        make_checkpoint(str(checkpoints / f"global_step{step}"), step=step, seed=step)
    os.truncate(checkpoints / "global_step20" / OURS, 3)
    unfinished = checkpoints / "global_step30"
    unfinished.mkdir()
    (checkpoints / "latest").write_text("global_step20")
    for target in (run, checkpoints):
        assert verify_cli.main([str(target)]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert [line.split(" ", 2)[:2] for line in lines] == [
            ["damaged", str(checkpoints / "global_step20:")], ["ok", str(checkpoints / "global_step10")],
            ["unchecked", str(checkpoints / "global_step30:")]]
        assert "delete" not in lines[2]
    shutil.rmtree(unfinished)
    make_checkpoint(str(checkpoints / "global_step20"), step=20, seed=20)
    assert verify_cli.main([str(run)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify_cli.main([str(empty)]) == 1
    out = capsys.readouterr().out.splitlines()[-1]
    assert "is not a checkpoint" in out and "OUTPUT/checkpoints" in out and "delete" not in out
