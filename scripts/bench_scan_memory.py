#!/usr/bin/env python3
"""The selective scan's backward peak on the CPU beside the memory model's recomputation term.

    python scripts/bench_scan_memory.py [--shapes 248x32x512 4x1024x128 32x128x256 2x16384x64] [--d-state 16]
                                        [--sequences 7x8192x64 7x32768x64]

Two measurements behind ``autoseg.networks.selective_scan``'s constants, each in a fresh process,
glibc's mmap threshold fixed as training fixes it (``memory_guard``), the resident-memory peak (VmHWM)
over the backward minus the resident size after the forward:

* one checkpointed block (``--shapes`` batch x tokens x d_inner): the peak in units of one
  (batch, padded tokens, d_inner, d_state) fp32 buffer beyond what the block's recomputation saves
  (``BACKWARD_BLOCK_BUFFERS``);
* a whole ``selective_scan`` cut into blocks (``--sequences``): the peak beyond the block's, in units of one
  (batch, tokens, d_inner) fp32 tensor (``FULL_LENGTH_GRADIENTS``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys

from child_env import child_env

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _mb(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{key}:\s+(\d+)", status.read()).group(1)) / 1024


def _child(kind: str, batch: int, length: int, d_inner: int, d_state: int) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from autoseg.networks.memory import saved_bytes
    from autoseg.networks.selective_scan import _block_peak_bytes, _scan_block, block_length, selective_scan
    from autoseg.training.memory_guard import return_freed_memory_to_system

    return_freed_memory_to_system()
    chunk = 32

    def backward_peak_mb() -> float:
        u, delta = torch.randn(batch, length, d_inner, requires_grad=True), torch.rand(batch, length, d_inner,
                                                                                        requires_grad=True)
        A = -torch.rand(d_inner, d_state, requires_grad=True)
        B, C = (torch.randn(batch, length, d_state, requires_grad=True) for _ in range(2))
        if kind == "block":
            y, state = checkpoint(_scan_block, u, delta, A, B, C, torch.zeros(batch, d_inner, d_state), chunk,
                                  use_reentrant=False)
            loss = y.sum() + state.sum()
        else:
            loss = selective_scan(u, delta, A, B, C, torch.ones(d_inner, requires_grad=True), chunk).sum()
        base = _mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        loss.backward()
        return _mb("VmHWM") - base

    backward_peak_mb()  # loads kernels
    gc.collect()
    peak = backward_peak_mb()
    if kind == "block":
        inputs = [torch.zeros(s, device="meta", requires_grad=True) for s in
                  [(batch, length, d_inner)] * 2 + [(d_inner, d_state)] + [(batch, length, d_state)] * 2
                  + [(batch, d_inner, d_state)]]
        saved = saved_bytes(lambda *a: _scan_block(*a, chunk), *inputs) / 2**20
        unit = batch * (-(-length // chunk) * chunk) * d_inner * d_state * 4 / 2**20
        return {"peak_mb": peak, "beyond_mb": peak - saved, "units": (peak - saved) / unit}
    block = min(length, block_length(batch, d_inner, d_state, chunk))
    block_peak = _block_peak_bytes(d_inner, d_state, chunk, batch, block) / 2**20
    unit = batch * length * d_inner * 4 / 2**20
    return {"peak_mb": peak, "beyond_mb": peak - block_peak, "units": (peak - block_peak) / unit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["248x32x512", "4x1024x128", "32x128x256", "2x16384x64"])
    parser.add_argument("--sequences", nargs="*", default=["7x8192x64", "7x32768x64"])
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return
    for kind, shapes, unit in (("block", args.shapes, "block buffers"), ("sequence", args.sequences,
                                                                          "whole-sequence tensors")):
        for shape in shapes:
            batch, length, d_inner = (int(v) for v in shape.split("x"))
            spec = json.dumps([kind, batch, length, d_inner, args.d_state])
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], capture_output=True,
                                  text=True, cwd=REPO, env=child_env())
            if done.returncode:
                print(f"{kind} {shape}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind:<8} {shape:<12} backward peak {r['peak_mb']:7.0f} MB, {r['beyond_mb']:6.0f} MB beyond the "
                  f"model's {'saved bytes' if kind == 'block' else 'block peak'} = {r['units']:.2f} {unit}")


if __name__ == "__main__":
    main()
