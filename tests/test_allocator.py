"""The console command restarts itself with glibc's huge-page tunable (``autoseg.allocator``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.allocator import THP_MODE, transparent_huge_pages_available, wants_relaunch, with_huge_pages

# A stand-in for the CLI's work: after console_main's relaunch, report the environment, the PID and
# the kernel's count of huge pages once a 64 MB torch tensor exists (torch's allocator is plain malloc).
PROBE = """
import os, sys
import autoseg.cli as cli
def probe():
    import torch
    tensor = torch.ones(2**23, dtype=torch.float64)
    huge_kb = [line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")][0].split()[1]
    print(os.environ.get("GLIBC_TUNABLES"), os.getpid(), huge_kb, int(tensor.sum()))
    return 0
cli.main = probe
raise SystemExit(cli.console_main())
"""

REPO = Path(__file__).resolve().parents[1]

needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not transparent_huge_pages_available(),
                               reason="needs Linux with transparent huge pages not 'never'")


def run_probe(tmp_path: Path, **env: str) -> tuple[str, int, int, int]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "AUTOSEG_HUGE_PAGES")}
    environ["PYTHONPATH"] = str(REPO)  # this checkout's autoseg, whatever an earlier install points to
    process = subprocess.Popen([sys.executable, str(script)], env={**environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # the first run re-executed before its work; the work ran once
    tunables, pid, huge_kb, total = lines[0].split()
    assert int(pid) == process.pid  # replaced in place: whoever waits on the PID (torchrun, a shell) still can
    assert int(total) == 2**23
    return tunables, int(pid), int(huge_kb), int(total)


@needs_thp
def test_the_command_restarts_with_huge_pages_and_torch_tensors_get_them(tmp_path):
    tunables, _, huge_kb, _ = run_probe(tmp_path)
    assert tunables == "glibc.malloc.hugetlb=1"
    _, _, huge_kb_without, _ = run_probe(tmp_path, AUTOSEG_HUGE_PAGES="0")
    # The kernel's own count: the 64 MB tensor sits in huge pages with the tunable, not without it
    # (where THP is 'always' the kernel gives them unasked too, so only the first half holds there).
    assert huge_kb >= 60 * 1024
    if "[madvise]" in THP_MODE.read_text():
        assert huge_kb_without < 60 * 1024


@needs_thp
def test_the_users_own_tunables_are_kept_and_an_opt_out_is_respected(tmp_path):
    tunables, *_ = run_probe(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert tunables == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    tunables, *_ = run_probe(tmp_path, AUTOSEG_HUGE_PAGES="0")
    assert tunables == "None"
    tunables, *_ = run_probe(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")  # the user's choice wins
    assert tunables == "glibc.malloc.hugetlb=0"


def test_no_restart_where_the_kernel_refuses_huge_pages_or_it_is_already_set(tmp_path):
    never, madvise = tmp_path / "never", tmp_path / "madvise"
    never.write_text("always madvise [never]\n")
    madvise.write_text("always [madvise] never\n")
    assert not wants_relaunch({}, never)
    assert not wants_relaunch({}, tmp_path / "missing")
    assert not wants_relaunch({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, madvise)
    assert not wants_relaunch({"AUTOSEG_HUGE_PAGES": "0"}, madvise)
    assert wants_relaunch({}, madvise) == sys.platform.startswith("linux")
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}
