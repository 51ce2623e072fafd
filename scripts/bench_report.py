#!/usr/bin/env python3
"""Time of ``autoseg report`` against ``autoseg evaluate`` on the same predictions, in one run.

    python scripts/bench_report.py [--dataset Dataset004_Hippocampus] [--cases 60] [-np 1]

Predictions are the references shifted along x by 0-4 voxels (case i by i mod 5), so
that every case has a disagreement to find and draw. ``evaluate`` runs first and writes
``summary.json`` beside the predictions, which ``report`` then reuses, as a user's
``evaluate`` then ``report`` would. Prints both wall times, seconds per case and the ratio
report / evaluate (what drawing costs on top of measuring), and the report's size on disk.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.cli import main as autoseg  # noqa: E402
from autoseg.io.images import read_label, write_label  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="Dataset004_Hippocampus")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("-np", "--num-processes", type=int, default=1)
    args = parser.parse_args()
    raw = REPO.parent / "shared" / "data"
    dataset = raw / args.dataset
    if not (dataset / "labelsTr").is_dir():
        raise SystemExit(f"{dataset} is missing (the real datasets live in ../shared/data beside the repo)")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        references, predictions = work / "labelsTr", work / "predictions"
        references.mkdir()
        for index, path in enumerate(sorted((dataset / "labelsTr").glob("*.nii.gz"))[: args.cases]):
            (references / path.name).symlink_to(path)
            label, geometry = read_label(path)
            write_label(np.roll(label, index % 5, axis=-1), predictions / path.name, geometry, path)
        cases = len(list(references.iterdir()))
        flags = [f"--raw={raw}", f"--preprocessed={work / 'pre'}", f"--results={work / 'res'}", "-d", args.dataset,
                 "-np", str(args.num_processes)]
        start = time.perf_counter()
        assert autoseg(["evaluate", str(references), str(predictions)] + flags) == 0
        evaluate_s = time.perf_counter() - start
        start = time.perf_counter()
        assert autoseg(["report", str(references), str(predictions), "--images", str(dataset / "imagesTr"),
                        "-o", str(work / "report")] + flags) == 0
        report_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (work / "report").rglob("*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{args.dataset}, {cases} cases, -np {args.num_processes}")
    print(f"evaluate  {evaluate_s:7.2f} s  ({evaluate_s / cases:.3f} s/case)")
    print(f"report    {report_s:7.2f} s  ({report_s / cases:.3f} s/case), {size / 2**20:.1f} MiB on disk")
    print(f"ratio report / evaluate: {report_s / evaluate_s:.2f}; peak memory of this process {peak:.2f} GB")


if __name__ == "__main__":
    main()
