"""The test suite's own rules: a real dataset missing in CI is a failure, not a skip."""

from __future__ import annotations

import pytest

from tests import conftest


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_shared_dataset_fails_under_ci_and_skips_elsewhere(ci, outcome, tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)  # an empty data folder
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="Dataset004_Hippocampus is missing"):
        conftest.shared_dataset("Dataset004_Hippocampus")
