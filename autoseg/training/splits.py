"""Five-fold cross-validation splits, deterministic and editable (``splits.json``).

Cases that belong together (two frames of one ACDC patient) go to the same fold: case ids
are grouped by ``group_pattern`` (default: ``patientNNN`` when present), so no patient is
seen in training and validation at once. The groups are dealt to folds exactly as nnU-Net v2 deals
cases (scikit-learn's ``KFold(5, shuffle=True, random_state=12345)`` over the sorted ids), so that
where no two cases share a group, fold N is nnU-Net's fold N and results compare fold by fold.
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
        key = (match.group(1) if match.groups() else match.group(0)) if match else case
        groups.setdefault(key, []).append(case)
    keys = sorted(groups)
    # KFold's shuffle: a legacy RandomState shuffles the indices once, then the folds are consecutive
    # runs of them, the first len % 5 one longer (as array_split cuts them).
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)
    folds = np.array_split(order, NUM_FOLDS)
    splits = []
    for fold in folds:
        val = sorted(c for i in fold for c in groups[keys[i]])
        splits.append({"train": sorted(set(case_ids) - set(val)), "val": val})
    return splits


def load_or_create_splits(path: Path, case_ids: list[str], group_pattern: str = DEFAULT_GROUP_PATTERN) -> list[dict]:
    """The splits in ``path`` (validated), or new ones written there. Users may edit the file:
    any number of folds, any assignment, as long as each fold's lists are disjoint and name
    preprocessed cases."""
    if path.exists():
        splits = read_json(path, UsageError)
        if not isinstance(splits, list) or not splits or not all(
                isinstance(s, dict) and set(s) == {"train", "val"}
                and all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in s.values())
                for s in splits):
            raise UsageError("must be a non-empty list of {\"train\": [case ids], \"val\": [case ids]}", path)
        unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - set(case_ids))
        if unknown:
            raise UsageError(f"names cases that are not preprocessed: {unknown[:5]} (removed from the dataset? "
                             f"take them out of {path.name}, or delete it to split the cases anew)", path)
        for index, split in enumerate(splits):
            if set(split["train"]) & set(split["val"]):
                raise UsageError(f"fold {index} has cases in both train and val: "
                                 f"{sorted(set(split['train']) & set(split['val']))[:5]}", path)
            if not split["train"] or not split["val"]:
                raise UsageError(f"fold {index} has an empty train or val list", path)
        return splits
    if len(case_ids) < NUM_FOLDS:
        raise UsageError(f"{len(case_ids)} cases cannot be split into {NUM_FOLDS} folds; train fold 'all' "
                         f"or write {path.name} by hand", path)
    try:
        splits = make_splits(case_ids, group_pattern=group_pattern)
    except re.error as exc:
        raise UsageError(f"the case grouping pattern {group_pattern!r} is not a regular expression: {exc}") from None
    if any(not split["val"] for split in splits):
        raise UsageError(f"the cases form fewer than {NUM_FOLDS} groups (patients); train fold 'all' "
                         f"or write {path.name} by hand", path)
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
