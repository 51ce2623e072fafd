#!/usr/bin/env python3
"""Planning time of the demo set, first with an empty measurement cache, then again with it filled.

    python scripts/bench_planning.py [--cases 6]

Each run is the ``autoseg plan-and-preprocess -d 999 -c 3d_fullres --no-preprocess`` command in a fresh
process (start-up included on both), every architecture, 2d and 3d_fullres; the cache
(``autoseg/planning/measurement_cache.py``) lives in a temporary folder, so the first run is a
new machine's and the second a re-plan's. Prints both times, their ratio and whether the two
plans are byte for byte equal. Run it alone: both runs see the same machine only then.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child_env import child_env

from autoseg.dataset.synthetic import make_synthetic_dataset


def plan_seconds(raw: Path, preprocessed: Path, cache: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoseg", "plan-and-preprocess", "-d", "999", "-c", "3d_fullres",
                    "--no-preprocess", f"--raw={raw}", f"--preprocessed={preprocessed}", f"--results={raw.parent / 'res'}"],
                   check=True, capture_output=True, env=child_env(AUTOSEG_CACHE_DIR=str(cache)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        raw = make_synthetic_dataset(work / "raw", num_cases=args.cases, num_test=0).parent
        cold = plan_seconds(raw, work / "pre_cold", work / "cache")
        warm = plan_seconds(raw, work / "pre_warm", work / "cache")
        name = "Dataset999_Synthetic"
        same = ((work / "pre_cold" / name / "plans.json").read_bytes()
                == (work / "pre_warm" / name / "plans.json").read_bytes())
    print(f"demo set ({args.cases} cases), every architecture, 2d + 3d_fullres, load {os.getloadavg()[0]:.1f}")
    print(f"| empty cache s | filled cache s | ratio | same plans |\n|---|---|---|---|\n"
          f"| {cold:.1f} | {warm:.1f} | {warm / cold:.2f} | {same} |")


if __name__ == "__main__":
    main()
