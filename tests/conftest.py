from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.dataset.synthetic import make_synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


_SUITE_CACHE: list[str] = []  # the measurement cache this run of the suite made, removed at its end


def pytest_configure(config):
    # The planner's measurement cache starts empty for every run of the suite, as on a fresh machine, and the
    # suite leaves the user's own cache alone; subprocesses inherit it, so planning the same set twice is warm.
    import tempfile

    _SUITE_CACHE.append(tempfile.mkdtemp(prefix="autoseg-test-cache-"))
    os.environ["AUTOSEG_CACHE_DIR"] = _SUITE_CACHE[-1]


def pytest_unconfigure(config):
    for folder in _SUITE_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


def shared_dataset(name: str) -> Path:
    """A real dataset of ../shared/data; skipped where it is absent, a failure under CI=true (CI always has it)."""
    path = SHARED_DATA / name
    if not (path / "dataset.json").exists():
        missing = f"{path} is missing (the real datasets live in ../shared/data beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {missing}", pytrace=False)
        pytest.skip(missing)
    return path


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> Path:
    """A pristine synthetic dataset; copy it before changing anything."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("raw"), num_cases=6, num_test=2)


@pytest.fixture
def dataset_copy(synthetic_raw, tmp_path) -> Path:
    target = tmp_path / "raw" / synthetic_raw.name
    shutil.copytree(synthetic_raw, target)
    return target


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def preprocess_tiny_synthetic(synthetic_raw: Path, work: Path):
    """The synthetic dataset planned (3d_fullres U-Net) and preprocessed under ``work``, its plan shrunk to a
    network that trains in seconds: (roots, dataset name, the --raw/--preprocessed/--results flags)."""
    from autoseg.paths import Roots

    roots = Roots(synthetic_raw.parent, work / "pre", work / "res")
    flags = [f"--raw={roots.raw}", f"--preprocessed={roots.preprocessed}", f"--results={roots.results}"]
    assert main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-np", "1", "-a", "unet"] + flags) == 0
    shrink_plan_to_tiny_unet(roots.plans_file(synthetic_raw.name))
    return roots, synthetic_raw.name, flags


def shrink_plan_to_tiny_unet(plans_file: Path) -> None:
    """Edit a planned 3d_fullres U-Net down to one that trains in seconds (8x32x32 patch, 4-8-16 features)."""
    from autoseg.planning.plans import load_plans, save_plans

    plans = load_plans(plans_file)
    unet = plans.configurations["3d_fullres"].architectures["unet"]
    unet.patch_size, unet.batch_size = [8, 32, 32], 2
    unet.kernel_sizes, unet.strides, unet.features = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [4, 8, 16]
    save_plans(plans, plans_file)


@dataclass
class Pipeline:
    """Where the ``pipeline`` fixture put each stage's output, and the exit code of each command."""

    raw: Path  # the raw root
    pre: Path
    res: Path
    predictions: Path
    evaluation: Path
    name: str
    codes: dict[str, int]

    @property
    def flags(self) -> list[str]:
        return [f"--raw={self.raw}", f"--preprocessed={self.pre}", f"--results={self.res}"]

    @property
    def dataset(self) -> Path:
        return self.raw / self.name

    @property
    def fold(self) -> Path:
        return self.res / self.name / "3d_fullres__unet" / "fold_0"


TRAIN_TINY = ["train", "999", "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
              "--num-workers", "0", "--seed", "0"]


@pytest.fixture(scope="session")
def pipeline(synthetic_raw, tmp_path_factory) -> Pipeline:
    """Every command once, on the synthetic dataset, under paths with spaces and non-ASCII characters."""
    work = tmp_path_factory.mktemp("pipeline") / "dossier à espaces ü"
    p = Pipeline(work / "données brutes", work / "pré traité", work / "résultats", work / "prédictions ø",
                 work / "évaluation", synthetic_raw.name, {})
    shutil.copytree(synthetic_raw, p.dataset)
    p.codes["check"] = main(["check", "-d", "999", "-np", "1", *p.flags])
    p.codes["plan-and-preprocess"] = main(["plan-and-preprocess", "-d", "999", "-c", "3d_fullres", "-a", "unet",
                                           "-np", "1", *p.flags])
    shrink_plan_to_tiny_unet(p.pre / p.name / "plans.json")
    p.codes["train"] = main([*TRAIN_TINY, *p.flags])  # ends by predicting and evaluating its validation cases
    p.codes["predict"] = main(["predict", "-i", str(p.dataset / "imagesTs"), "-o", str(p.predictions), "-d", "999",
                               "-c", "3d_fullres", "-f", "0", "--disable-tta", *p.flags])
    p.codes["evaluate"] = main(["evaluate", str(p.dataset / "labelsTs"), str(p.predictions), "-d", "999", "-np", "1",
                                "-o", str(p.evaluation), *p.flags])
    return p


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous: fixed ports collide with parallel jobs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peers_python() -> Path:
    """The python of the peers' environment (nnU-Net v2, MONAI: ../shared/peers/setup.sh makes it), where the
    tests that compare with nnU-Net's own code run it; ``PEERS_VENV`` names another, as for the benchmarks."""
    return Path(os.environ.get("PEERS_VENV", "/tmp/peers-venv")) / "bin" / "python"
