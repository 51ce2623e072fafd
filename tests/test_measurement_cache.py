"""The planner's measurements kept between runs (``autoseg.planning.measurement_cache``)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

import autoseg.networks.memory as memory
import autoseg.planning.measurement_cache as measurement_cache
import autoseg.planning.planner as planner
from autoseg.fingerprint import load_fingerprint
from autoseg.planning.plans import load_plans
from autoseg.records import TEMPORARY_PREFIX, dumps

REPO = Path(__file__).resolve().parents[1]
NAME = "Dataset004_Hippocampus"


def plan_hippocampus() -> str:
    planner._ESTIMATES.clear()  # a new process: only the disk remembers (fake_steps restores it after the test)
    fingerprint = load_fingerprint(REPO / "dataset_fingerprints" / f"{NAME}.json")
    committed = load_plans(REPO / "plans" / f"{NAME}.json")
    return dumps(planner.plan_dataset(fingerprint, committed.labels, committed.gpu_memory_gb,
                                      architectures=["unet", "resenc_unet"]))


@pytest.fixture
def fake_steps(monkeypatch):
    """Counts the fake training steps the memory model runs."""
    calls = []
    real = memory.step_over_saved
    # The process's own estimates are what the rest of the suite plans with: put back as they were.
    kept = dict(planner._ESTIMATES)

    def counted(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(memory, "step_over_saved", counted)
    yield calls
    planner._ESTIMATES.clear()
    planner._ESTIMATES.update(kept)


def test_a_second_planning_measures_nothing_and_plans_the_same(tmp_path, monkeypatch, fake_steps):
    monkeypatch.setenv("AUTOSEG_CACHE_DIR", str(tmp_path))
    first = plan_hippocampus()
    measured = len(fake_steps)
    assert measured >= 4  # unet and resenc_unet, 2d and 3d_fullres: one fake step each at least
    stored = json.loads((tmp_path / "memory_measurements.json").read_text())
    assert len(stored["entries"]) == measured and stored["code_version"] == measurement_cache.code_version()
    second = plan_hippocampus()
    assert len(fake_steps) == measured  # nothing measured again
    assert second == first
    # And the plan is the committed one (made without any cache), for the two architectures planned here.
    committed = json.loads((REPO / "plans" / f"{NAME}.json").read_text())
    for configuration in ("2d", "3d_fullres"):
        for name in ("unet", "resenc_unet"):
            assert (json.loads(second)["configurations"][configuration]["architectures"][name]
                    == committed["configurations"][configuration]["architectures"][name])


def test_changed_code_drops_every_entry(tmp_path, monkeypatch, fake_steps):
    monkeypatch.setenv("AUTOSEG_CACHE_DIR", str(tmp_path))
    plan_hippocampus()
    measured = len(fake_steps)
    monkeypatch.setattr(measurement_cache, "code_version", lambda: "a network file was edited")
    plan_hippocampus()
    assert len(fake_steps) == 2 * measured
    stored = json.loads((tmp_path / "memory_measurements.json").read_text())
    assert stored["code_version"] == "a network file was edited" and len(stored["entries"]) == measured


def test_the_code_version_follows_the_network_sources(tmp_path, monkeypatch):
    before = measurement_cache.code_version()
    package = tmp_path / "autoseg"
    (package / "networks").mkdir(parents=True)
    (package / "training").mkdir()
    (package / "networks" / "unet.py").write_text("KERNEL = 3\n")
    (package / "training" / "loss.py").write_text("")
    monkeypatch.setattr(measurement_cache, "_PACKAGE", package)
    monkeypatch.setattr(measurement_cache, "_SOURCES", (package / "networks", package / "training" / "loss.py"))
    measurement_cache.code_version.cache_clear()
    try:
        edited_before = measurement_cache.code_version()
        (package / "networks" / "unet.py").write_text("KERNEL = 5\n")
        measurement_cache.code_version.cache_clear()
        assert measurement_cache.code_version() not in (edited_before, before)
    finally:
        monkeypatch.undo()
        measurement_cache.code_version.cache_clear()
    assert measurement_cache.code_version() == before


def test_a_corrupt_cache_is_measured_over_and_an_unwritable_one_is_skipped(tmp_path, monkeypatch, fake_steps):
    monkeypatch.setenv("AUTOSEG_CACHE_DIR", str(tmp_path))
    (tmp_path / "memory_measurements.json").write_text('{"code_version": "x", "entries": {"step')  # cut short
    first = plan_hippocampus()
    measured = len(fake_steps)
    assert measured >= 4
    assert len(json.loads((tmp_path / "memory_measurements.json").read_text())["entries"]) == measured
    assert not list(tmp_path.glob(f"{TEMPORARY_PREFIX}*"))  # written under a temporary name, renamed

    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv("AUTOSEG_CACHE_DIR", str(blocked))
    assert plan_hippocampus() == first  # the cache cannot be written: the plan is still made, measured again
    assert len(fake_steps) == 2 * measured

    monkeypatch.setenv("AUTOSEG_CACHE_DIR", "off")
    assert measurement_cache.cache_file() is None
    assert plan_hippocampus() == first
    assert len(fake_steps) == 3 * measured


def _remember_many(first: int) -> None:
    for index in range(first, first + 40):
        measurement_cache.remembered(f"key {index}", lambda: float(index))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_planners_writing_at_once_keep_every_entry(tmp_path, monkeypatch):
    # The planner's workers (-np) each add their measurements to one file: 4 writers of 40 entries each,
    # interleaved, must leave all 160 (each reads, adds and replaces the file).
    monkeypatch.setenv("AUTOSEG_CACHE_DIR", str(tmp_path))
    measurement_cache.code_version()  # computed once here, not by every writer
    writers = [multiprocessing.get_context("fork").Process(target=_remember_many, args=(40 * w,)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [writer.exitcode for writer in writers] == [0] * 4
    entries = json.loads((tmp_path / "memory_measurements.json").read_text())["entries"]
    assert entries == {f"key {index}": float(index) for index in range(160)}
    assert not list(tmp_path.glob(f"{TEMPORARY_PREFIX}*"))
