"""SIGKILL plan-and-preprocess at a random moment; running it again gives byte-identical output."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def _run(raw: Path, pre: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoseg", "plan-and-preprocess", "-d", "999", "-c", "3d_fullres",
                             "-np", "2", f"--raw={raw}", f"--preprocessed={pre}", f"--results={pre.parent / 'res'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _snapshot(pre: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pre)): p.read_bytes() for p in sorted(pre.rglob("*")) if p.is_file()}


def test_killed_preprocessing_resumes_to_identical_files(synthetic_raw, tmp_path):
    reference = tmp_path / "reference"
    assert _run(synthetic_raw.parent, reference).wait(timeout=300) == 0
    expected = _snapshot(reference)
    rng = random.Random(7)
    for attempt in range(2):
        interrupted = tmp_path / f"killed{attempt}"
        process = _run(synthetic_raw.parent, interrupted)
        time.sleep(rng.uniform(2.5, 5.0))  # start-up takes ~2 s; kill somewhere in fingerprint/plan/preprocess
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        left = [p for p in interrupted.rglob("*") if p.is_file()]
        assert not any(p.name.startswith(".") and p.suffix == ".tmp" and p.stat().st_size == 0 for p in left)
        rerun = _run(synthetic_raw.parent, interrupted)
        _, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err.decode()[-2000:]
        got = {k: v for k, v in _snapshot(interrupted).items() if not Path(k).name.startswith(".")}
        assert got.keys() == expected.keys()
        assert all(got[k] == expected[k] for k in expected), [k for k in expected if got[k] != expected[k]]
