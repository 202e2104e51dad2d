"""Crash-safe publishing (atomic.py): a reader sees the old folder or the complete new one, and nothing a user had
is replaced unasked."""
import os

import pytest

from beamlora_ds.checkpointing.atomic import atomic_dir, out_dir_problem, replace_dir, write_text_atomically


def test_atomic_dir_publishes_a_new_folder_and_leaves_nothing_else(tmp_path):
    with atomic_dir(str(tmp_path / "out"), overwrite=False) as tmp:
        assert not os.path.exists(tmp_path / "out")  # nothing visible until the end
        (open(os.path.join(tmp, "a.txt"), "w")).close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["a.txt"]


def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(str(out), overwrite=True) as tmp:
            (open(os.path.join(tmp, "new.txt"), "w")).close()
            raise OSError("disk full")
    assert os.listdir(out) == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]  # the temporary folder is gone


def test_atomic_dir_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(str(out), overwrite=False):
            pytest.fail("must not be entered")
    assert os.listdir(out) == ["mine.txt"]
    with atomic_dir(str(out), overwrite=True) as tmp:
        (open(os.path.join(tmp, "new.txt"), "w")).close()
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]


def test_atomic_dir_clears_the_leftovers_of_a_killed_writer(tmp_path):
    (tmp_path / ".out.partial-abc123").mkdir()
    with atomic_dir(str(tmp_path / "out"), overwrite=False):
        pass
    assert os.listdir(tmp_path) == ["out"]


def test_out_dir_problem(tmp_path):
    assert out_dir_problem(str(tmp_path / "new"), overwrite=False) is None
    (tmp_path / "empty").mkdir()
    assert out_dir_problem(str(tmp_path / "empty"), overwrite=False) is None
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in out_dir_problem(str(tmp_path / "file"), overwrite=True)
    os.symlink(tmp_path / "empty", tmp_path / "link")
    assert "is not a folder" in out_dir_problem(str(tmp_path / "link"), overwrite=True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert "holds folders" in out_dir_problem(str(tmp_path / "run"), overwrite=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert "overwrite=True" in out_dir_problem(str(tmp_path / "adapter"), overwrite=False)
    assert out_dir_problem(str(tmp_path / "adapter"), overwrite=True) is None


def test_replace_dir_swaps_a_folder_in(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "n.txt").write_text("new")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "o.txt").write_text("old")
    replace_dir(str(tmp_path / "new"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["n.txt"]


def test_write_text_atomically_replaces_the_file(tmp_path):
    path = tmp_path / "latest"
    path.write_text("global_step1")
    write_text_atomically(str(path), "global_step2")
    assert path.read_text() == "global_step2" and os.listdir(tmp_path) == ["latest"]
