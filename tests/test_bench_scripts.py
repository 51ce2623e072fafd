"""The benchmark scripts' parsers, on output that the reference tools really printed."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_accuracy import parse_nnunet_log  # noqa: E402


def test_nnunet_console_log_of_a_one_epoch_training_is_read():
    # nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainer_1epoch -device cpu (nnU-Net 2.8.1), as it printed it.
    log = parse_nnunet_log((REPO / "tests" / "data" / "nnunet_v2_1epoch_console.log").read_text())
    assert log.epochs == 1 and log.epoch_seconds == [2069.26]
    assert log.pseudo_dice == [0.7695, 0.7927]  # written as [np.float32(0.7695), np.float32(0.7927)]
    assert log.first_timestamp == datetime(2026, 12, 4, 2, 51, 18, 112555)
    assert log.done_timestamp == datetime(2026, 12, 4, 3, 25, 49, 113462)
    assert (log.done_timestamp - log.first_timestamp).total_seconds() > log.epoch_seconds[0]
