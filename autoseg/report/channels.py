"""Which pixels of a case are drawn: one channel in grey, or an RGB file in colour.

Channels count as ``autoseg check`` counts them: the components of the case's files in
channel order, so channel 1 of a dataset stored as one RGB ``CASE_0000.png`` is its
green component, and channel 1 of a multi-file MRI dataset is ``CASE_0001``.
"""

from __future__ import annotations

import numpy as np

from autoseg.errors import DatasetError
from autoseg.io.images import Geometry, read_header, read_image

COLOUR_COMPONENTS = (3, 4)  # RGB, RGBA


def locate_channel(image_files: list[str], channel: int) -> tuple[str, int]:
    """The file and the component in it that hold ``channel``."""
    remaining = channel
    for file in image_files:
        _, components = read_header(file)
        if remaining < components:
            return file, remaining
        remaining -= components
    raise DatasetError(f"has no channel {channel}: the case's {len(image_files)} file(s) hold {channel - remaining}",
                       image_files[0])


def read_shown_image(image_files: list[str], channel: int | None) -> tuple[np.ndarray, Geometry, str, str]:
    """(pixels, geometry, file, what is shown): ``(Z, Y, X)`` for one channel, ``(Z, Y, X, 3)`` for colour.

    ``channel`` None means the first channel, or the colour image when the first file is RGB.
    """
    if channel is None:
        _, components = read_header(image_files[0])
        if components in COLOUR_COMPONENTS:
            image, geometry = read_image(image_files[0])
            return np.moveaxis(image[:3], 0, -1), geometry, image_files[0], "RGB colour"
        channel = 0
    file, component = locate_channel(image_files, channel)
    image, geometry = read_image(file)
    return image[component], geometry, file, f"channel {channel}"
