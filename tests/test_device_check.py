"""scripts/device_check.py's CPU fallback (tiny sizes), so that the prepared GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoseg.planning.plans import load_plans

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_runs_every_check_at_tiny_sizes_on_the_cpu(tmp_path):
    report_file = tmp_path / "device_check.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--tiny", "--json",
                             str(report_file), "--data", str(tmp_path / "no-data")],
                            capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    planned = {(d, a) for d in ("Dataset004_Hippocampus", "Dataset027_ACDC")
               for a in load_plans(REPO / "plans" / f"{d}.json").configuration("3d_fullres").architectures}
    assert {(r["dataset"], r["arch"]) for r in report["architectures"]} == planned
    for row in report["architectures"]:
        assert row["step_s"] > 0 and row["estimate_gb"] > 0 and row["batch"] == 1
    nnunet = report["nnunet"]
    assert "ratio" in nnunet or "nnunetv2 does not import" in nnunet["skipped"]
    assert report["torchrun"]["validation_summary"] and report["torchrun"]["backend"] == "gloo"
    assert "mamba_ssm" in report["mamba_scan"]["skipped"] or "CUDA" in report["mamba_scan"]["skipped"]
    prediction = report["prediction"]
    assert prediction["cases"] == 3 and prediction["failed"] == 0 and "synthetic" in prediction["source"]
    for check in ("step", "vs nnU-Net", "torchrun", "mamba scan", "predict"):
        assert any(line.startswith(check) for line in result.stdout.splitlines()), check
