"""dataset.json and the listing of cases: the raw dataset as autoseg understands it.

Reads the nnU-Net v2 layout unchanged. Differences, on purpose:

* Label values need not be contiguous (BraTS's 0, 1, 2, 4; TotalSegmentator ids): the
  network's classes are the sorted label values, and predictions are written back with
  the original values. nnU-Net refuses such datasets.
* Every path, including those of an explicit ``dataset`` entry, is resolved and must
  stay inside the dataset folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import DatasetError
from autoseg.io.images import SUPPORTED_ENDINGS
from autoseg.records import read_json

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class CaseFiles:
    case_id: str
    images: list[str]  # one file per channel, in channel order (an RGB file may hold several)
    label: str | None


@dataclass
class DatasetSpec:
    name: str
    root: str
    channel_names: list[str]
    labels: dict[str, Any]  # name -> int, or list of ints for a region
    file_ending: str
    num_training: int
    regions_class_order: list[int] | None = None
    cases: list[CaseFiles] = field(default_factory=list)
    listed_cases: bool = False  # dataset.json lists each case's files ("dataset"): that list fixes channel order

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, list) for v in self.labels.values())

    @property
    def ignore_label(self) -> int | None:
        value = self.labels.get("ignore")
        return int(value) if value is not None else None

    @property
    def label_values(self) -> list[int]:
        """Every value a label map may hold, sorted (background and ignore included)."""
        values = set()
        for value in self.labels.values():
            values.update(value if isinstance(value, list) else [value])
        return sorted(values)

    @property
    def class_values(self) -> list[int]:
        """Label values the network predicts, in output-channel order (not for regions)."""
        return [v for v in self.label_values if v != self.ignore_label]


def load_dataset_spec(dataset_dir: str | Path, with_cases: bool = True, json_file: str | Path | None = None) -> DatasetSpec:
    """Parse and validate ``dataset.json`` (or ``json_file``, a dataset.json by another name, for its
    labels only); every problem names the file and the key."""
    root = Path(dataset_dir).resolve()
    if not root.is_dir():
        raise DatasetError("dataset folder does not exist", root)
    json_path = Path(json_file).resolve() if json_file is not None else root / "dataset.json"
    data = read_json(json_path, DatasetError)
    if not isinstance(data, dict):
        raise DatasetError("must hold a JSON object", json_path)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            raise DatasetError(f"missing key '{key}'", json_path)
    channel_names = _channel_names(data["channel_names"], json_path)
    labels = _labels(data["labels"], json_path)
    file_ending = data["file_ending"]
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DatasetError(f"'file_ending' must be a string like \".nii.gz\", got {file_ending!r}", json_path)
    if not file_ending.lower().endswith(SUPPORTED_ENDINGS):
        raise DatasetError(f"'file_ending' {file_ending} is not a format autoseg reads "
                           f"({', '.join(SUPPORTED_ENDINGS)})", json_path)
    num_training = data.get("numTraining", 0)
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise DatasetError(f"'numTraining' must be a non-negative integer, got {num_training!r}", json_path)
    order = data.get("regions_class_order")
    spec = DatasetSpec(name=root.name, root=str(root), channel_names=channel_names, labels=labels,
                       file_ending=file_ending, num_training=num_training, regions_class_order=order)
    if spec.has_regions:
        _check_regions_class_order(order, labels, json_path)
    if with_cases:
        spec.cases = _explicit_cases(data["dataset"], root, json_path) if "dataset" in data else list_cases(root, spec)
        spec.listed_cases = "dataset" in data
    return spec


def _check_regions_class_order(order: Any, labels: dict[str, Any], path: Path) -> None:
    """One label value per region, each a value of the regions (it is what a voxel of that region is
    written as), none twice: a string or a value no region holds failed only at prediction or evaluation."""
    regions = [k for k in labels if k not in ("background", "ignore")]
    values = {v for k in regions for v in (labels[k] if isinstance(labels[k], list) else [labels[k]])}
    if (not isinstance(order, list) or len(order) != len(regions)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v in values for v in order)
            or len(set(order)) != len(order)):
        raise DatasetError(f"region-based labels need 'regions_class_order' with one label value per region "
                           f"({len(regions)}), each a value of the regions ({sorted(values)}), none twice; "
                           f"got {order!r}", path)


def _channel_names(value: Any, path: Path) -> list[str]:
    if not isinstance(value, dict) or not value:
        raise DatasetError("'channel_names' must be a non-empty object like {\"0\": \"CT\"}", path)
    try:
        by_index = {int(k): v for k, v in value.items()}  # "0", also " 0" or "00" as int() reads them
    except ValueError:
        raise DatasetError(f"'channel_names' keys must be channel numbers, got {sorted(value)}", path) from None
    indices = sorted(by_index)
    if len(by_index) != len(value) or indices != list(range(len(indices))):
        raise DatasetError(f"'channel_names' keys must be 0..{len(value) - 1}, each once, got {sorted(value)}", path)
    names = [by_index[i] for i in indices]
    if not all(isinstance(n, str) and n for n in names):
        raise DatasetError("'channel_names' values must be non-empty strings", path)
    return names


def _labels(value: Any, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise DatasetError("'labels' must be a non-empty object like {\"background\": 0, \"liver\": 1}", path)
    labels: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for name, raw in value.items():
        items = raw if isinstance(raw, list) else [raw]
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise DatasetError(f"label '{name}' must be an integer or a list of integers, got {raw!r}", path)
        if any(v < 0 or v > 32767 for v in items):
            raise DatasetError(f"label '{name}' value {raw!r} is outside 0..32767", path)
        if not isinstance(raw, list):
            if raw in seen:
                raise DatasetError(f"labels '{seen[raw]}' and '{name}' have the same value {raw}", path)
            seen[raw] = name
        labels[name] = list(raw) if isinstance(raw, list) else int(raw)
    if labels.get("background") != 0:
        raise DatasetError("'labels' must contain \"background\": 0", path)
    ignore = labels.get("ignore")
    if ignore is not None:
        if isinstance(ignore, list):
            raise DatasetError("the 'ignore' label must be a single integer", path)
        # Region lists count too: an ignore value inside a region would drop the region's voxels of it
        others = [v for k, raw in labels.items() if k != "ignore" for v in (raw if isinstance(raw, list) else [raw])]
        if others and ignore <= max(others):
            raise DatasetError("the 'ignore' label must have the highest value", path)
    return labels


def _explicit_cases(entries: Any, root: Path, path: Path) -> list[CaseFiles]:
    if not isinstance(entries, dict):
        raise DatasetError("'dataset' must map case ids to {\"images\": [...], \"label\": ...}", path)
    cases = []
    for case_id, entry in sorted(entries.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or not entry["images"]:
            raise DatasetError(f"'dataset' entry '{case_id}' needs a non-empty 'images' list", path)
        images = [str(inside(root, p, path, f"'dataset' entry '{case_id}'")) for p in entry["images"]]
        label = entry.get("label")
        label = str(inside(root, label, path, f"'dataset' entry '{case_id}'")) if label is not None else None
        cases.append(CaseFiles(case_id, images, label))
    return cases


def inside(root: Path, relative: Any, json_path: Path, where: str) -> Path:
    """Resolve a path from dataset.json and refuse it if it leaves the dataset folder."""
    if not isinstance(relative, str) or not relative:
        raise DatasetError(f"{where}: path must be a non-empty string, got {relative!r}", json_path)
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise DatasetError(f"{where}: path '{relative}' leaves the dataset folder", json_path)
    return resolved


def list_cases(root: Path, spec: DatasetSpec, images_folder: str = "imagesTr",
               labels_folder: str | None = "labelsTr") -> list[CaseFiles]:
    """Group ``CASE_XXXX<ending>`` files into cases; labels are matched by case id."""
    images_dir = root / images_folder
    ending = spec.file_ending
    by_case: dict[str, dict[int, str]] = {}
    if images_dir.is_dir():
        for file in sorted(images_dir.iterdir()):
            if not file.name.endswith(ending) or file.name.startswith("."):
                continue
            match = _CHANNEL_SUFFIX.match(file.name[: -len(ending)])
            if match:
                by_case.setdefault(match["case"], {})[int(match["channel"])] = str(file)
    labels: dict[str, str] = {}
    if labels_folder and (root / labels_folder).is_dir():
        for file in sorted((root / labels_folder).iterdir()):
            if file.name.endswith(ending) and not file.name.startswith("."):
                labels[file.name[: -len(ending)]] = str(file)
    cases = []
    for case_id in sorted(set(by_case) | set(labels)):
        channels = by_case.get(case_id, {})
        images = [channels[i] for i in sorted(channels)]
        cases.append(CaseFiles(case_id, images, labels.get(case_id)))
    return cases
