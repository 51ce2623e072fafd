"""autoseg convert-dicom IMAGES LABELS -o DATASET --labels labels.json: DICOM series + DICOM SEG to a raw dataset."""

from __future__ import annotations

import sys
from pathlib import Path

from autoseg.cli import add_common


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert-dicom", help="DICOM series with DICOM SEG labels to the nnU-Net raw layout")
    parser.add_argument("images", help="folder of DICOM image series (one case each)")
    parser.add_argument("labels", help="folder of DICOM SEG files, each referencing its image series")
    parser.add_argument("-o", "--output", required=True, help="the new dataset folder, e.g. raw/Dataset050_Mine")
    parser.add_argument("--labels", dest="mapping", required=True,
                        help='labels.json: {"segment label": label value, ...}; unknown segments are listed, not guessed')
    parser.add_argument("--modality", metavar="MODALITY",
                        help="convert only the series of this DICOM modality (CT, MR, PT...): an export of several "
                             "modalities is refused without it, as one channel holds one kind of image")
    parser.add_argument("--dicom-channels", nargs="+", metavar="PATTERN",
                        help="several channels: one SeriesDescription pattern per channel, in channel order "
                             "(case-insensitive glob, e.g. '*T2*' '*ADC*'), matched within each study as predict "
                             "--dicom-channels matches them; the SEG may reference any channel's series")
    add_common(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from autoseg.dataset.dicom_convert import convert_dicom

    training, test, refused = convert_dicom(Path(args.images), Path(args.labels), Path(args.output), Path(args.mapping),
                                           args.modality, args.dicom_channels)
    for line in refused:
        print(f"autoseg: error: {line}; not converted", file=sys.stderr)
    print(f"convert-dicom: {training} labelled case(s) in imagesTr/labelsTr, {test} without a SEG in imagesTs, "
          f"{len(refused)} series refused -> {args.output}")
    return 2 if refused else 0
