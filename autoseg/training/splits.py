"""Five-fold cross-validation splits, deterministic and editable (``splits.json``).

Cases that belong together (two frames of one ACDC patient) go to the same fold: case ids
are grouped by ``group_pattern`` (default: ``patientNNN`` when present), so no patient is
seen in training and validation at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from autoseg.errors import UsageError
from autoseg.records import read_json, save_json

NUM_FOLDS = 5
DEFAULT_GROUP_PATTERN = r"^(patient\d+)_"


def make_splits(case_ids: list[str], seed: int = 12345, group_pattern: str = DEFAULT_GROUP_PATTERN) -> list[dict]:
    """[{"train": [...], "val": [...]}] * 5; every case is in exactly one validation fold."""
    pattern = re.compile(group_pattern)
    groups: dict[str, list[str]] = {}
    for case in sorted(case_ids):
        match = pattern.match(case)
        groups.setdefault(match.group(1) if match else case, []).append(case)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    folds = [order[i::NUM_FOLDS] for i in range(NUM_FOLDS)]
    splits = []
    for fold in folds:
        val = sorted(c for i in fold for c in groups[keys[i]])
        splits.append({"train": sorted(set(case_ids) - set(val)), "val": val})
    return splits


def load_or_create_splits(path: Path, case_ids: list[str]) -> list[dict]:
    if path.exists():
        splits = read_json(path, UsageError)
        if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
            raise UsageError("must be a list of {\"train\": [...], \"val\": [...]}", path)
        unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
        if unknown:
            raise UsageError(f"names cases that are not preprocessed: {unknown[:5]}", path)
        return splits
    splits = make_splits(case_ids)
    save_json(splits, path)
    return splits


def cases_for_fold(splits: list[dict], fold: str, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) for fold ``0``..``4`` or ``all`` (train on everything, validate on a few)."""
    if fold == "all":
        return sorted(case_ids), sorted(case_ids)[: max(1, len(case_ids) // 5)]
    if not fold.isdigit() or int(fold) >= len(splits):
        raise UsageError(f"fold must be 0..{len(splits) - 1} or 'all', got '{fold}'")
    split = splits[int(fold)]
    return list(split["train"]), list(split["val"])
