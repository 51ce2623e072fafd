"""find-best: which model, or ensemble of two, to predict with, by cross-validation Dice.

Candidates are the models (``CONFIGURATION__ARCHITECTURE`` folders under the dataset's
results) whose validation is finished for every fold asked (by default every fold of
``splits.json``), and every pair of them whose validation kept the class probabilities
(``autoseg train ... --save-probabilities``): a pair is the average of the two
probabilities, as ``autoseg predict -c A B`` computes it. For each candidate the
postprocessing is determined on all its validation cases and saved
(``postprocessing.json``, which ``predict`` applies); candidates are ranked by the mean
Dice over classes (of the per-case mean) after postprocessing, a single model before an
ensemble on a tie. The result is ``find_best.json`` and ``find_best.txt`` (the table and
the ``autoseg predict`` command) under the dataset's results folder.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.errors import UsageError
from autoseg.evaluation.crossval import has_probabilities, validated_folds, validation_cases
from autoseg.inference.ensemble import ensemble_folder, ensemble_name, split_model_name
from autoseg.inference.postprocessing import (PostprocessingDecision, ScoredCase, determine_postprocessing,
                                              save_postprocessing)
from autoseg.paths import Roots
from autoseg.records import atomic_write_bytes, read_json, save_json

FIND_BEST_SCHEMA_VERSION = 1


@dataclass
class Candidate:
    name: str  # a model folder name, or an ensemble name (members joined by "+")
    members: list[str]
    mean_dice: float  # cross-validation, as predicted
    mean_dice_postprocessed: float
    postprocessing: str  # the steps chosen, in words
    num_cases: int
    per_class_dice_postprocessed: dict[str, float]


@dataclass
class FindBestResult:
    schema_version: int
    dataset: str
    folds: list[str]
    ranking: list[Candidate]  # best first
    not_compared: list[str]  # a line per model or ensemble left out, and why
    best: str
    predict_command: str
    notes: list[str] = field(default_factory=list)


def find_best(roots: Roots, dataset_name: str, labels: dict, folds: list[str] | None = None, ensembles: bool = True,
              num_processes: int = 2, progress: bool = True) -> FindBestResult:
    results = roots.results / dataset_name
    folds = folds or _all_folds(roots, dataset_name)
    models, not_compared = [], []
    for model_dir in sorted(p for p in results.glob("*__*") if p.is_dir()):
        done = validated_folds(model_dir)
        missing = [f for f in folds if f not in done]
        if missing:
            not_compared.append(f"{model_dir.name}: validation of fold(s) {' '.join(missing)} missing")
        else:
            models.append(model_dir)
    if not models:
        raise UsageError(f"no model has finished validation of folds {' '.join(folds)} (train them, or pass the "
                         f"folds you have with -f){'; ' + '; '.join(not_compared) if not_compared else ''}", results)
    ranking = []
    for model_dir in models:
        cases = validation_cases(roots, dataset_name, model_dir, folds)
        decision = _decide(cases, labels, f"{model_dir.name}, folds {' '.join(folds)}", num_processes, progress)
        save_postprocessing(decision, model_dir)
        ranking.append(_candidate(model_dir.name, [model_dir.name], decision))
    if ensembles:
        with_probabilities = [m for m in models if has_probabilities(m, folds)]
        not_compared += [f"ensembles with {m.name}: its validation kept no probabilities (train with "
                         "--save-probabilities, or re-run `autoseg train ... --validation-only --save-probabilities`)"
                         for m in models if m not in with_probabilities]
        for first, second in itertools.combinations(with_probabilities, 2):
            members = [first.name, second.name]
            name = ensemble_name(members)
            a = validation_cases(roots, dataset_name, first, folds, probabilities=True)
            b = validation_cases(roots, dataset_name, second, folds, probabilities=True)
            if set(a) != set(b):
                not_compared.append(f"{name}: the members were validated on different cases")
                continue
            cases = {c: ScoredCase(c, a[c].reference, None, a[c].probabilities + b[c].probabilities) for c in a}
            decision = _decide(cases, labels, f"{name}, folds {' '.join(folds)}", num_processes, progress)
            save_postprocessing(decision, ensemble_folder(roots, dataset_name, members))
            ranking.append(_candidate(name, sorted(members), decision))
    ranking.sort(key=lambda c: (-c.mean_dice_postprocessed, len(c.members), c.name))
    best = ranking[0]
    result = FindBestResult(FIND_BEST_SCHEMA_VERSION, dataset_name, folds, ranking, not_compared, best.name,
                            predict_command(dataset_name, best.members, folds))
    save_json(result, results / "find_best.json")
    atomic_write_bytes(results / "find_best.txt", (format_find_best(result) + "\n").encode())
    return result


def _all_folds(roots: Roots, dataset_name: str) -> list[str]:
    splits_file = roots.preprocessed_dataset(dataset_name) / "splits.json"
    if not splits_file.is_file():
        raise UsageError("no splits.json: nothing has been trained on this dataset yet", splits_file)
    return [str(i) for i in range(len(read_json(splits_file, UsageError)))]


def _decide(cases: dict[str, ScoredCase], labels: dict, source: str, num_processes: int,
            progress: bool) -> PostprocessingDecision:
    return determine_postprocessing([cases[c] for c in sorted(cases)], labels, source, num_processes, progress)


def _candidate(name: str, members: list[str], decision: PostprocessingDecision) -> Candidate:
    return Candidate(name, members, decision.mean_dice_before, decision.mean_dice_after, decision.describe(),
                     decision.num_cases, decision.dice_after)


def predict_command(dataset_name: str, members: list[str], folds: list[str]) -> str:
    configurations, architectures = zip(*(split_model_name(m) for m in members))
    as_flag = lambda values: " ".join(dict.fromkeys(values)) if len(set(values)) == 1 else " ".join(values)  # noqa: E731
    return (f"autoseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {dataset_name} -c {as_flag(configurations)} "
            f"-a {as_flag(architectures)} -f {' '.join(folds)}")


def format_find_best(result: FindBestResult) -> str:
    width = max(24, *(len(c.name) for c in result.ranking))
    header = f"{'model':{width}s} {'Dice (CV)':>10s} {'+ postproc.':>11s}  postprocessing"
    lines = [f"find-best on {result.dataset}, folds {' '.join(result.folds)} "
             f"({result.ranking[0].num_cases} validation cases)", header, "-" * len(header)]
    for c in result.ranking:
        lines.append(f"{c.name:{width}s} {c.mean_dice:10.4f} {c.mean_dice_postprocessed:11.4f}  {c.postprocessing}")
    lines += [f"not compared: {line}" for line in result.not_compared]
    lines += ["", f"best: {result.best}", f"  {result.predict_command}"]
    return "\n".join(lines)


def load_find_best(path: str | Path) -> FindBestResult:
    from autoseg.records import load_record

    return load_record(FindBestResult, path, UsageError, FIND_BEST_SCHEMA_VERSION)
