"""Temporaries of killed writers: recognised by name, removed when their writer is gone, kept while it runs."""

import os
import subprocess
import sys
import time
from pathlib import Path

from autoseg import records
from autoseg.records import (TEMPORARY_PREFIX, atomic_write_bytes, check_writable_folder, remove_stale_temporaries,
                             temporary_sibling)

_LEAVE_A_TEMPORARY = """
import os, sys
from autoseg.records import temporary_sibling
fd, tmp = temporary_sibling(sys.argv[1])
os.write(fd, b"half a checkpoint")
os._exit(0)  # as if killed: nothing cleans up
"""


def _temporary_of_a_dead_writer(final: Path) -> Path:
    before = set(final.parent.iterdir())
    subprocess.run([sys.executable, "-c", _LEAVE_A_TEMPORARY, str(final)], check=True)
    (left,) = set(final.parent.iterdir()) - before
    return left


def test_temporaries_of_dead_writers_are_removed_down_to_the_depth_and_nothing_else(tmp_path):
    (tmp_path / "fold_0" / "validation").mkdir(parents=True)
    dead_top = _temporary_of_a_dead_writer(tmp_path / "case_001.nii.gz")
    assert dead_top.name.startswith(TEMPORARY_PREFIX) and dead_top.name.endswith("-case_001.nii.gz")
    dead_sub = _temporary_of_a_dead_writer(tmp_path / "fold_0" / "checkpoint_latest.pt")
    too_deep = _temporary_of_a_dead_writer(tmp_path / "fold_0" / "validation" / "case_002.nii.gz")
    fd, live = temporary_sibling(tmp_path / "being_written.npz")  # this process is alive: its file stays
    os.close(fd)
    dead_folder = dead_top.with_name(dead_top.name.replace("case_001.nii.gz", "report"))
    dead_folder.mkdir()
    (dead_folder / "index.html").write_text("<html>")
    host, pid = records._TEMPORARY_NAME.match(dead_top.name).groups()
    foreign_fresh = tmp_path / f"{TEMPORARY_PREFIX}othermachine.{pid}-abc-a.npz"
    foreign_old = tmp_path / f"{TEMPORARY_PREFIX}othermachine.{pid}-def-b.npz"
    for path in (foreign_fresh, foreign_old):
        path.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (two_days_ago, two_days_ago))
    ordinary = [tmp_path / "case_003.nii.gz", tmp_path / ".hidden_by_the_user", tmp_path / "fold_0" / "log.jsonl"]
    for path in ordinary:
        path.write_bytes(b"keep me")

    removed = remove_stale_temporaries(tmp_path, depth=2)

    assert sorted(removed) == sorted([dead_top, dead_sub, dead_folder, foreign_old])
    for path in (dead_top, dead_sub, dead_folder, foreign_old):
        assert not path.exists()
    for path in (too_deep, live, foreign_fresh, *ordinary):
        assert path.exists(), path
    assert remove_stale_temporaries(tmp_path / "fold_0", depth=2) == [too_deep]


def test_a_command_checking_its_output_folder_clears_what_a_killed_run_left(tmp_path):
    left = _temporary_of_a_dead_writer(tmp_path / "checkpoint_latest.pt")
    atomic_write_bytes(tmp_path / "checkpoint_best.pt", b"complete")
    check_writable_folder(tmp_path)
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pt"], "no probe or temporary is left"
