"""Mamba's selective scan (S6) without custom kernels, plus the step-by-step reference.

The recurrence, per channel d and state n (A diagonal, everything else input-dependent):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        y_t = <C_t, h_t> + D * u_t

``selective_scan`` evaluates it without a Python loop over tokens:

* tokens are split into chunks; inside every chunk at once, a Hillis-Steele doubling scan
  composes the affine maps ``h -> a*h + b`` in log2(chunk) tensor steps. Only products of
  decays (all in [0, 1]) are formed, never ``exp(-cumsum)``, so nothing overflows however
  strong the decay;
* the chunk end states are chained by the same doubling scan over chunks, and every token
  then adds its chunk's incoming state times its cumulative decay;
* long sequences (a whole 3D feature map at full resolution) are cut into blocks of a few
  million state elements, scanned one after another with the state carried over, and each
  block is gradient-checkpointed when training: memory stays O(block) instead of
  O(L * d_inner * d_state) times the number of doubling steps.

On CUDA with ``mamba_ssm`` installed, its fused kernel is used instead.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional fused CUDA kernel
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_scan
except Exception:  # noqa: BLE001 - any import failure (missing package, CUDA mismatch) means "not available"
    _mamba_ssm_scan = None

# Elements (batch * tokens * d_inner * d_state) per checkpointed block: ~16 MB per float32 tensor.
BLOCK_ELEMENTS = 4 * 2 ** 20
# Block-sized gradient buffers live at once while one block's backward runs, besides what its
# recomputation saved: measured on the CPU (VmHWM over one block's backward, glibc's mmap
# threshold fixed as training fixes it) at (batch, tokens, d_inner) = (248, 32, 512),
# (4, 1024, 128), (32, 128, 256), (2, 16384, 64) and d_state 16: 1.8, 1.7, 2.0 and 1.9 buffers
# over the recomputation's saved bytes, the same under bf16 autocast (the scan runs in fp32).
# (6, measured earlier with glibc's sliding threshold, counted heap fragmentation.) Both constants:
# ``python scripts/bench_scan_memory.py``.
BACKWARD_BLOCK_BUFFERS = 2
# A sequence cut into several blocks: its backward holds gradients of the whole sequence (of the
# output and of ``u`` and ``delta``, each (batch, length, d_inner) in fp32) besides the block being
# recomputed: measured over selective_scan's backward at batch 7, d_inner 64, 8,192 and 32,768
# tokens (576-token blocks): 2.3 such tensors beyond the block's peak at 32,768 (twice), 1.3-3.6 at
# 8,192 (small absolute sizes, 19-50 MB, so noisy).
FULL_LENGTH_GRADIENTS = 3


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, chunk_size: int = 32) -> torch.Tensor:
    """u, delta: (batch, L, d_inner); A: (d_inner, d_state); B, C: (batch, L, d_state); D: (d_inner,).

    Returns y: (batch, L, d_inner). ``delta`` is used as given (softplus already applied).
    """
    if u.is_cuda and _mamba_ssm_scan is not None:
        y = _mamba_ssm_scan(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
                            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D)
        return y.transpose(1, 2)
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    block = block_length(batch, d_inner, d_state, chunk_size)
    state = u.new_zeros(batch, d_inner, d_state)
    outputs = []
    for start in range(0, length, block):
        args = (u[:, start:start + block], delta[:, start:start + block], A,
                B[:, start:start + block], C[:, start:start + block], state, chunk_size)
        # Checkpointed whenever training, however short the sequence: memory then grows with the
        # sequence the same way at every patch size, which the planner's memory model relies on.
        if torch.is_grad_enabled():
            y, state = checkpoint(_scan_block, *args, use_reentrant=False)
        else:
            y, state = _scan_block(*args)
        outputs.append(y)
    return torch.cat(outputs, dim=1) + u * D


def block_length(batch: int, d_inner: int, d_state: int, chunk_size: int) -> int:
    """Tokens per checkpointed block: about ``BLOCK_ELEMENTS`` state elements, a whole number of chunks."""
    return max(chunk_size, BLOCK_ELEMENTS // (batch * d_inner * d_state) // chunk_size * chunk_size)


def recompute_peak_bytes(d_inner: int, d_state: int, chunk_size: int, batch: int, length: int,
                         device_type: str = "cuda") -> float:
    """Peak bytes of recomputing and differentiating the largest checkpointed block in backward.

    A block holds ``min(length, block_length)`` tokens of every sample, so the peak grows with a
    short sequence (a bottleneck's few tokens) and stops growing once a block is full. A sequence of
    several blocks also holds, while its blocks' backward runs, gradients of the whole sequence
    (``FULL_LENGTH_GRADIENTS``). The same on both devices: the H200's steps of both U-Mambas came within
    0.98-1.10 of the estimate."""
    block = min(length, block_length(batch, d_inner, d_state, chunk_size))
    whole_sequence = FULL_LENGTH_GRADIENTS * batch * length * d_inner * 4 if length > block else 0
    return _block_peak_bytes(d_inner, d_state, chunk_size, batch, block) + whole_sequence


@lru_cache(maxsize=4096)
def _block_peak_bytes(d_inner: int, d_state: int, chunk_size: int, batch: int, length: int) -> float:
    # What the block's recomputation saves, measured on the meta device (shapes only), plus the
    # gradient buffers of its backward.
    from autoseg.networks.memory import saved_bytes

    shapes = [(batch, length, d_inner), (batch, length, d_inner), (d_inner, d_state), (batch, length, d_state),
              (batch, length, d_state), (batch, d_inner, d_state)]
    inputs = [torch.zeros(shape, device="meta", requires_grad=True) for shape in shapes]
    saved = saved_bytes(lambda *args: _scan_block(*args, chunk_size), *inputs)
    padded = -(-length // chunk_size) * chunk_size
    return saved + BACKWARD_BLOCK_BUFFERS * batch * padded * d_inner * d_state * 4


def _scan_block(u, delta, A, B, C, state, chunk: int):
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    pad = (-length) % chunk
    if pad:  # delta = 0 makes padded steps the identity (decay 1, no input)
        u, delta, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (u, delta, B, C))
    n_chunks = (length + pad) // chunk
    decay = torch.exp(delta.unsqueeze(-1) * A)                      # (b, L, d, n)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)               # (b, L, d, n)
    shape = (batch, n_chunks, chunk, d_inner, d_state)
    cum_decay, local = _doubling_scan(decay.reshape(shape), drive.reshape(shape), dim=2)
    # Chain the chunks: the state entering chunk c is the scan of (end decay, end state) over c.
    end_decay, end_state = cum_decay[:, :, -1], local[:, :, -1]     # (b, chunks, d, n)
    first = end_state[:, :1] + end_decay[:, :1] * state.unsqueeze(1)
    _, after = _doubling_scan(end_decay, torch.cat([first, end_state[:, 1:]], dim=1), dim=1)
    entering = torch.cat([state.unsqueeze(1), after[:, :-1]], dim=1)
    h = local + cum_decay * entering.unsqueeze(2)
    y = torch.einsum("bcldn,bcln->bcld", h, C.reshape(batch, n_chunks, chunk, d_state))
    return y.reshape(batch, -1, d_inner)[:, :length], after[:, -1]


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t * h_{t-1} + b_t (h before the start = 0) along ``dim``.

    Returns (prod of a up to t, h_t). Out-of-place so autograd can go through it.
    """
    n = a.shape[dim]
    step = 1
    while step < n:
        a_head, a_tail, a_prev = a.narrow(dim, 0, step), a.narrow(dim, step, n - step), a.narrow(dim, 0, n - step)
        b_head, b_tail, b_prev = b.narrow(dim, 0, step), b.narrow(dim, step, n - step), b.narrow(dim, 0, n - step)
        b = torch.cat([b_head, b_tail + a_tail * b_prev], dim=dim)
        a = torch.cat([a_head, a_tail * a_prev], dim=dim)
        step *= 2
    return a, b


def selective_scan_reference(u, delta, A, B, C, D) -> torch.Tensor:
    """The recurrence one token at a time: slow, obviously right, for tests only."""
    batch, length, d_inner = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + u * D
