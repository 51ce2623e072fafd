"""SIGKILL a command at a random moment (fixed seed); running it again finishes with the result of a run
that was never interrupted, and no file under a final name is ever truncated."""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from autoseg.cli import main
from autoseg.records import TEMPORARY_PREFIX
from tests.faults import assert_complete

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # as the killed processes run (OMP_NUM_THREADS=1), so their numbers match this one's


def _run(raw: Path, pre: Path) -> subprocess.Popen:
    # One architecture: planning all six would spend the test's minutes in the memory model's fake passes,
    # and a kill at 2.5-5 s then lands in planning only; with one it lands in any of the three stages.
    return subprocess.Popen([sys.executable, "-m", "autoseg", "plan-and-preprocess", "-d", "999", "-c", "3d_fullres",
                             "-a", "unet", "-np", "2", f"--raw={raw}", f"--preprocessed={pre}", f"--results={pre.parent / 'res'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _snapshot(pre: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pre)): p.read_bytes() for p in sorted(pre.rglob("*")) if p.is_file()}


def test_killed_preprocessing_resumes_to_identical_files(synthetic_raw, tmp_path):
    reference = tmp_path / "reference"
    start = time.perf_counter()
    assert _run(synthetic_raw.parent, reference).wait(timeout=300) == 0
    whole_run = time.perf_counter() - start
    expected = _snapshot(reference)
    rng = random.Random(7)
    for attempt in range(2):
        interrupted = tmp_path / f"killed{attempt}"
        process = _run(synthetic_raw.parent, interrupted)
        # Somewhere in fingerprint, plan or preprocess: a fraction of the uninterrupted run's own time, so a
        # loaded machine (slower start-up) moves the kill with it instead of into the start-up.
        time.sleep(rng.uniform(0.35, 0.75) * whole_run)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, "the kill came after the run had ended; move it earlier"
        left = [p for p in interrupted.rglob("*") if p.is_file()]
        assert not any(p.name.startswith(TEMPORARY_PREFIX) and p.stat().st_size == 0 for p in left)
        rerun = _run(synthetic_raw.parent, interrupted)
        _, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err.decode()[-2000:]
        got = {k: v for k, v in _snapshot(interrupted).items() if not Path(k).name.startswith(".")}
        assert not [p for p in interrupted.rglob(f"{TEMPORARY_PREFIX}*")], "the rerun removes the killed run's temporaries"
        assert got.keys() == expected.keys()
        assert all(got[k] == expected[k] for k in expected), [k for k in expected if got[k] != expected[k]]


# ---- train and predict -----------------------------------------------------------------------------------------

def _start(argv: list, stdout=subprocess.PIPE) -> subprocess.Popen:
    """``autoseg ARGV`` in its own process group (SIGKILL reaches its workers too), one torch thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "autoseg", *map(str, argv)], stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _kill_when(process: subprocess.Popen, ready, delay: float, timeout: float = 120.0) -> None:
    """SIGKILL ``process`` ``delay`` seconds after ``ready()`` first holds (or when it has ended by itself)."""
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class _Lines:
    """The lines a process prints, collected by a thread as they come."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.thread.start()

    def count(self, prefix: str) -> int:
        return sum(line.startswith(prefix) for line in list(self.lines))


def _same(a, b, where="checkpoint") -> None:
    """Equal, tensors bit for bit, leaving out timings (keys ending in _seconds)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = {k for k in a if not str(k).endswith("_seconds")}
        assert keys == {k for k in b if not str(k).endswith("_seconds")}, where
        for key in keys:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_no_partial_files(folder: Path) -> None:
    for file in (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        assert_complete(file)


EPOCHS = 4


def test_killed_training_continues_from_its_last_checkpoint_to_the_same_weights(pipeline, tmp_path, capsys, request):
    train = ["train", "999", "3d_fullres", "0", "--epochs", EPOCHS, "--iters-per-epoch", 3, "--val-iters", 1,
             "--num-workers", 0, "--seed", 5, "--no-validation", *pipeline.flags[:2]]
    fold = tmp_path / "{}" / pipeline.name / "3d_fullres__unet" / "fold_0"
    # One torch thread in-process too, as in the killed subprocess: bf16 kernels (the CPU default where native)
    # sum in another order with another thread count, so bit-identity holds for equal thread counts only.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    start = time.perf_counter()
    assert main([*map(str, train), f"--results={tmp_path / 'straight'}"]) == 0
    epoch_seconds = (time.perf_counter() - start) / EPOCHS  # with checkpoints and plots
    reference = torch.load(str(fold).format("straight") + "/checkpoint_final.pt", weights_only=True)
    killed = Path(str(fold).format("killed"))

    # Where the kill lands: after 0..EPOCHS-2 finished epochs, up to one epoch later (model files, a training
    # step, validation, a checkpoint or the plot being written), always before the run ends.
    rng = random.Random(11)
    finished, delay = rng.randrange(EPOCHS - 1), rng.uniform(0.0, epoch_seconds)
    process = _start([*train, f"--results={tmp_path / 'killed'}"])
    lines = _Lines(process)
    try:
        _kill_when(process, lambda: (killed / "plans.json").exists() and lines.count("epoch ") >= finished, delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    lines.thread.join(timeout=10)
    printed = lines.count("epoch ")
    assert printed < EPOCHS, "the kill came after the run had ended; move it earlier"
    _assert_no_partial_files(killed)
    saved = torch.load(killed / "checkpoint_latest.pt", weights_only=True)["epoch"] if (
        killed / "checkpoint_latest.pt").exists() else 0
    assert saved in (printed, printed + 1), "the checkpoint is written just before its epoch's line"

    capsys.readouterr()
    assert main([*map(str, train), f"--results={tmp_path / 'killed'}", "--continue"]) == 0
    out = capsys.readouterr().out
    assert (f"continuing from epoch {saved} of {EPOCHS}" if saved else "starting from the beginning") in out
    assert out.count("epoch ") - out.count("continuing from epoch") == EPOCHS - saved, "only the lost epochs rerun"
    _same(torch.load(killed / "checkpoint_final.pt", weights_only=True), reference)


def test_killed_prediction_reruns_to_byte_identical_label_maps(pipeline, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for folder in ("imagesTr", "imagesTs"):
        for image in (pipeline.dataset / folder).iterdir():
            shutil.copy(image, inputs)
    predict = ["predict", "-i", inputs, "-d", "999", "-c", "3d_fullres", "-f", "0", "--disable-tta", *pipeline.flags]
    start = time.perf_counter()
    assert main([*map(str, predict), "-o", str(tmp_path / "straight")]) == 0
    expected = {p.name: p.read_bytes() for p in (tmp_path / "straight").iterdir()}
    assert len(expected) == 8
    case_seconds = (time.perf_counter() - start) / len(expected)

    out = tmp_path / "killed"
    rng = random.Random(12)  # after 0..6 cases are written, up to one case later: reading, predicting or writing
    written, delay = rng.randrange(len(expected) - 1), rng.uniform(0.0, case_seconds)
    process = _start([*predict, "-o", out], stdout=subprocess.DEVNULL)
    try:
        _kill_when(process, lambda: out.is_dir() and len([p for p in out.iterdir() if not p.name.startswith(".")])
                   >= written, delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    done = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert len(done) < len(expected), "the kill came after the run had ended; move it earlier"
    assert all(done[name] == expected[name] for name in done), "a file under its final name is incomplete"

    capsys.readouterr()
    assert main([*map(str, predict), "-o", str(out)]) == 0
    assert f"{len(expected) - len(done)} written, {len(done)} already there, 0 failed" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "the rerun removes the killed run's temporaries"
