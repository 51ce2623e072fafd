"""autoseg: self-configuring segmentation for 2D and 3D medical images.

The pipeline is a chain of stages, each a module with one job:
check -> fingerprint -> plan -> preprocess -> train -> predict -> evaluate.
Each stage hands the next a typed record saved as JSON (see ``autoseg.records``).

Array convention used everywhere: numpy arrays are indexed like SimpleITK's
``GetArrayFromImage`` output, i.e. (z, y, x) for 3D and (y, x) for 2D, and every
spacing stored in a record is in that same array order (reversed ITK order).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from autoseg import Segmenter`` without importing torch for every ``autoseg`` command.
    if name == "Segmenter":
        from autoseg.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")


__all__ = ["Segmenter", "__version__"]
