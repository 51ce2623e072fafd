"""Ensembles of prediction folders: what ``nnUNetv2_ensemble`` does for nnU-Net users.

Each folder is the output of ``autoseg predict --save-probabilities`` (one model, or one
ensemble, each): ``CASE.npz`` beside the case's label map. The probabilities of a case are
averaged over the folders and turned into labels as one model's would be (argmax, or regions
above 0.5), and the label map is written with the geometry and header of the first folder's
label map of that case, so it lies exactly where the input image did. Predicting with several
models at once (``predict -c 2d 3d_fullres``) gives the same; this is for folders predicted
separately (other machines, other days) without running the models again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autoseg.errors import AutosegError, UsageError
from autoseg.inference.ensemble import labels_of, mean_probabilities, save_probability_file
from autoseg.inference.postprocessing import PostprocessingDecision, apply_postprocessing
from autoseg.io.images import SUPPORTED_ENDINGS, read_header, write_label
from autoseg.records import TEMPORARY_PREFIX, check_writable_folder

PROBABILITY_ENDING = ".npz"


@dataclass
class EnsembleResult:
    written: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)


def ensemble_folders(inputs: list[Path], output: Path, postprocessing: PostprocessingDecision | None = None,
                     save_probabilities: bool = False, overwrite: bool = False) -> EnsembleResult:
    """Write the ensemble of the prediction folders ``inputs`` into ``output``, case by case."""
    inputs, output = [Path(f).resolve() for f in inputs], Path(output).resolve()
    if len(inputs) < 2:
        raise UsageError("give two or more prediction folders to ensemble")
    if len(set(inputs)) < len(inputs):
        raise UsageError("a folder is given twice (its probabilities would count twice)")
    for folder in inputs:
        if not folder.is_dir():
            raise UsageError("is not a folder", folder)
        if folder == output:
            raise UsageError("the output folder must differ from the input folders", output)
    cases = {folder: {p.name[:-len(PROBABILITY_ENDING)] for p in folder.glob(f"*{PROBABILITY_ENDING}")
                      if not p.name.startswith(TEMPORARY_PREFIX)}  # what a killed predict left half-written
             for folder in inputs}
    every = set().union(*cases.values())
    if not every:
        raise UsageError("no probability files (CASE.npz, written by predict --save-probabilities) in any "
                         "input folder")
    for folder, found in cases.items():  # as nnU-Net: the same cases everywhere, not a silent subset
        missing = sorted(every - found)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UsageError(f"has no probability file for {len(missing)} case(s) the other folders have: {shown}",
                             folder)
    references = {case: _label_map_of(inputs[0], case) for case in sorted(every)}  # all found before any write
    check_writable_folder(output)
    result = EnsembleResult()
    for case, reference in references.items():
        target = output / reference.name
        if target.exists() and (not save_probabilities or (output / f"{case}{PROBABILITY_ENDING}").exists()) \
                and not overwrite:
            result.skipped_existing.append(case)
            continue
        mean, values, regions = mean_probabilities([folder / f"{case}{PROBABILITY_ENDING}" for folder in inputs])
        geometry, _ = read_header(reference)
        if list(mean.shape[1:]) != geometry.array_shape:
            raise AutosegError(f"probabilities of shape {list(mean.shape[1:])} do not fit its label map "
                               f"{reference.name} ({geometry.array_shape})", inputs[0] / f"{case}{PROBABILITY_ENDING}")
        labels = apply_postprocessing(labels_of(mean, values, regions).reshape(geometry.shape), postprocessing)
        write_label(labels, target, geometry, reference_file=reference, largest_label=max(values))
        if save_probabilities:
            save_probability_file(output / f"{case}{PROBABILITY_ENDING}", mean, values, regions)
        result.written.append(case)
    return result


def _label_map_of(folder: Path, case: str) -> Path:
    """The label map ``predict`` wrote beside ``CASE.npz`` (any image format, not a DICOM SEG), whose geometry
    and header the ensemble's label map takes."""
    # By the endings autoseg writes, not a pattern: a 3D TIFF's CASE.json, an MHD's CASE.zraw are no label maps.
    found = [folder / f"{case}{ending}" for ending in SUPPORTED_ENDINGS if ending != ".jpg"
             if (folder / f"{case}{ending}").is_file()]
    if len(found) != 1:
        raise AutosegError(f"needs exactly one label map {case}.* beside {case}{PROBABILITY_ENDING} for the case's "
                           f"geometry, found {len(found)} ({', '.join(sorted(p.name for p in found)) or 'none'})",
                           folder)
    return found[0]
