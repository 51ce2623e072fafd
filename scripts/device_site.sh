#!/usr/bin/env bash
# Packs what the GPU machine lacks (MONAI, SimpleITK, nibabel, batchgenerators, and nnU-Net v2 with
# its own needs, for the step comparison) into one .whl/site.tar.xz for Python 3.12 on x86-64.
# Why one xz archive and not the wheels: the wheels are 70 MB (SimpleITK alone 53 MB) and a device
# call carries at most 64 MiB; xz packs the unpacked tree into ~40 MB, which leaves room for the
# 16 MB Hippocampus dataset. A wheel is a zip of its site-packages tree, so unpacking it is
# installing it (no scripts are needed: nnU-Net is driven through its entry functions).
#
#   scripts/device_site.sh                      # writes .whl/site.tar.xz (add /.whl/ to .git/info/exclude)
#   on the device: mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platform="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# The versions that ran on the H200 on 2026-12-04 (its image has torch 2.11, numpy, scipy, einops, pandas...).
python3 -m pip download -q $platform -d "$work/wheels" SimpleITK==2.5.7 monai==1.6.1 nibabel==5.4.2 \
  batchgenerators==0.25.5 nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgeneratorsv2==0.3.6 \
  connected-components-3d==4.1.1 blosc2==4.15.0 ndindex==1.10.1
# acvl-utils is published as a source archive only (pure Python)
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" acvl-utils==0.2.6
mkdir -p "$work/site" .whl
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
tar -cJf .whl/site.tar.xz.tmp -C "$work/site" . && mv .whl/site.tar.xz.tmp .whl/site.tar.xz
ls -l .whl/site.tar.xz
