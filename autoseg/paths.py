"""The three roots and the names of folders under them.

As in nnU-Net: raw datasets under ``AUTOSEG_RAW``, preprocessed data and plans under
``AUTOSEG_PREPROCESSED``, trained models under ``AUTOSEG_RESULTS``. Each can be given by
flag or environment variable; without either they default to ``./autoseg_data/{raw,
preprocessed,results}`` in the current folder, and the nnU-Net variables
(``nnUNet_raw`` ...) are honoured when autoseg's own are unset, so an nnU-Net user's
shell works unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import UsageError

_ENV = {
    "raw": ("AUTOSEG_RAW", "nnUNet_raw"),
    "preprocessed": ("AUTOSEG_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("AUTOSEG_RESULTS", "nnUNet_results"),
}
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-.]+$")


@dataclass(frozen=True)
class Roots:
    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def resolve(cls, raw: str | None = None, preprocessed: str | None = None, results: str | None = None) -> "Roots":
        given = {"raw": raw, "preprocessed": preprocessed, "results": results}
        paths = {}
        for key, (own, nnunet) in _ENV.items():
            value = given[key] or os.environ.get(own) or os.environ.get(nnunet) or str(Path("autoseg_data") / key)
            paths[key] = Path(value).expanduser().resolve()
        return cls(**paths)

    def find_dataset(self, dataset: str | int) -> str:
        """Full dataset name for an id (``4``, ``004``) or a name, looked up under the raw, preprocessed and
        results roots (as nnU-Net does: a machine that only predicts may hold nothing but the results)."""
        text = str(dataset)
        if _DATASET_NAME.match(text):
            return text
        if not text.isdigit():
            raise UsageError(f"dataset '{text}' is neither an id (e.g. 4) nor a name like Dataset004_Name")
        number = int(text)
        candidates = []
        for root in (self.raw, self.preprocessed, self.results):
            if root.is_dir():
                candidates += [p.name for p in root.iterdir()
                               if p.is_dir() and (m := _DATASET_NAME.match(p.name)) and int(m.group(1)) == number]
        names = sorted(set(candidates))
        if not names:
            raise UsageError(f"no dataset with id {number} under {self.raw}, {self.preprocessed} or {self.results} "
                             "(set AUTOSEG_RAW or pass --raw)")
        if len(names) > 1:
            raise UsageError(f"several datasets have id {number}: {names}; pass the full name")
        return names[0]

    def raw_dataset(self, name: str) -> Path:
        return self.raw / name

    def preprocessed_dataset(self, name: str) -> Path:
        return self.preprocessed / name

    def fingerprint_file(self, name: str) -> Path:
        return self.preprocessed_dataset(name) / "dataset_fingerprint.json"

    def plans_file(self, name: str) -> Path:
        return self.preprocessed_dataset(name) / "plans.json"

    def training_output(self, name: str, configuration: str, architecture: str, fold: int | str) -> Path:
        return self.results / name / f"{configuration}__{architecture}" / f"fold_{fold}"
