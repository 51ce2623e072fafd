#!/usr/bin/env python3
"""Planning time of the demo set: one worker and two with an empty measurement cache, then again filled.

    python scripts/bench_planning.py [--cases 6]

Each run is the ``autoseg plan-and-preprocess -d 999 -c 3d_fullres --no-preprocess -np N`` command in a
fresh process (start-up included on all), every architecture, 2d and 3d_fullres; each cache
(``autoseg/planning/measurement_cache.py``) lives in a temporary folder of its own. Runs: ``-np 1``
with an empty cache (the architectures one after another, a new machine), ``-np 2`` with an empty
cache (side by side in two workers), ``-np 2`` again with the cache the run before filled (a
re-plan). Prints the three times, the ratios to the first and whether all three plans are byte for
byte equal. Run it alone: the runs see the same machine only then.
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


def plan_seconds(raw: Path, preprocessed: Path, cache: Path, num_processes: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoseg", "plan-and-preprocess", "-d", "999", "-c", "3d_fullres",
                    "--no-preprocess", "-np", str(num_processes), f"--raw={raw}", f"--preprocessed={preprocessed}",
                    f"--results={raw.parent / 'res'}"],
                   check=True, capture_output=True, env=child_env(AUTOSEG_CACHE_DIR=str(cache)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        raw = make_synthetic_dataset(work / "raw", num_cases=args.cases, num_test=0).parent
        load = os.getloadavg()[0]
        serial = plan_seconds(raw, work / "pre_serial", work / "cache_serial", 1)
        parallel = plan_seconds(raw, work / "pre_parallel", work / "cache", 2)
        warm = plan_seconds(raw, work / "pre_warm", work / "cache", 2)
        name = "Dataset999_Synthetic"
        plans = {(work / f"pre_{run}" / name / "plans.json").read_bytes() for run in ("serial", "parallel", "warm")}
    print(f"demo set ({args.cases} cases), every architecture, 2d + 3d_fullres, load {load:.1f} at the start")
    print(f"| -np 1, empty cache s | -np 2, empty cache s | -np 2, filled cache s | ratios | same plans |\n"
          f"|---|---|---|---|---|\n| {serial:.1f} | {parallel:.1f} | {warm:.1f} | "
          f"{parallel / serial:.2f}, {warm / serial:.2f} | {len(plans) == 1} |")


if __name__ == "__main__":
    main()
