#!/usr/bin/env python3
"""Regenerate the committed fingerprints and plans (dataset_fingerprints/, plans/).

    python scripts/update_references.py

Run after a deliberate change to the fingerprint or the planner, and commit the diff:
the tests compare the planner's output with these files, so the diff is the review.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.dataset.spec import load_dataset_spec  # noqa: E402
from autoseg.dataset.synthetic import make_synthetic_dataset  # noqa: E402
from autoseg.fingerprint import compute_fingerprint, save_fingerprint  # noqa: E402
from autoseg.planning.planner import plan_dataset  # noqa: E402
from autoseg.planning.plans import save_plans  # noqa: E402

REFERENCE_DATASETS = ["Dataset004_Hippocampus", "Dataset027_ACDC"]


def write_references(raw: Path) -> None:
    fingerprint = compute_fingerprint(raw, num_processes=2, progress=False)
    save_fingerprint(fingerprint, REPO / "dataset_fingerprints" / f"{raw.name}.json")
    spec = load_dataset_spec(raw, with_cases=False)
    plans = plan_dataset(fingerprint, spec.labels, regions_class_order=spec.regions_class_order, num_processes=2)
    save_plans(plans, REPO / "plans" / f"{raw.name}.json")
    print(f"wrote references for {raw.name}")


def main() -> None:
    # No options; --help prints this docstring instead of regenerating the references.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    shared = REPO.parent / "shared" / "data"
    for name in REFERENCE_DATASETS:
        if (shared / name).is_dir():
            write_references(shared / name)
        else:
            print(f"skipped {name}: {shared / name} is missing")
    with tempfile.TemporaryDirectory() as tmp:
        write_references(make_synthetic_dataset(tmp))


if __name__ == "__main__":
    main()
