"""The mLSTM cell of xLSTM (Beck et al. 2024) in chunkwise-parallel form, plus the step-by-step reference.

Per head, with exponential input gate i_t, sigmoid forget gate f_t, matrix memory C and
normaliser n (k scaled by 1/sqrt(d)):

    C_t = f_t C_{t-1} + i_t k_t v_t^T      n_t = f_t n_{t-1} + i_t k_t
    h_t = C_t^T q_t / max(|n_t . q_t|, 1)

Exponentials overflow, so every quantity is kept divided by exp(m_t), a running max of the
log gate weights; the ratio above is unchanged by that scaling (the "1" becomes exp(-m_t)),
so any consistent stabiliser gives the same h.

``mlstm_chunkwise`` splits the sequence into chunks of ``chunk_size`` tokens:

* inside a chunk, the parallel (attention-like) form: log weights
  ``b_t - b_s + i_s`` (b = cumulative log-sigmoid forget gate) for s <= t, stabilised by
  their row max — a (chunk x chunk) matrix per chunk, so memory is O(L * chunk), not O(L^2);
* between chunks, the matrix memory (d x d per head) is carried by a parallel prefix scan
  over chunks (log2(chunks) vectorised steps, no Python loop over chunks or tokens), and
  each token reads it with its decay exp(b_t).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

# Training checkpoints the cell: its backward recomputes the forward (saving what autograd needs) and then
# holds gradients of those tensors besides. Measured on the CPU, the backward's peak over the forward is
# 2.4x the recomputation's saved bytes at 2,240 tokens (batch 4, 4 heads of 16), 2.1x at batch 8 and 1.7x
# at 89,600 tokens (batch 1); the memory model takes 2 there. On CUDA (H200, 2026-12-04, device_check.py)
# the whole xLSTM-UNet step's allocator peak left room for 0.7-1.1x only (Hippocampus 40x56x40 batch 3,
# ACDC 8x128x112 batch 2; the rest of the step model matched CUDA's allocated peak there). 2 over-estimated
# those steps by 1.42-1.45. Why the devices differ is not measured: glibc's heap, which the CPU figure
# includes, and the caching allocator's reuse of the recomputation's transients are the likely part.
BACKWARD_PEAK_OVER_SAVED = {"cpu": 2.0, "cuda": 1.1}


def mlstm_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i_pre: torch.Tensor,
                    f_pre: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """q, k, v: (batch, heads, L, d); i_pre, f_pre: (batch, heads, L) gate pre-activations."""
    batch, heads, length, d = q.shape
    k = k / math.sqrt(d)
    chunk = min(chunk_size, length)
    pad = (-length) % chunk
    if pad:  # appended tokens come after every real one, so causality keeps them harmless
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i_pre, f_pre = (F.pad(t, (0, pad)) for t in (i_pre, f_pre))
    n_chunks = (length + pad) // chunk
    q, k, v = (t.reshape(batch, heads, n_chunks, chunk, d) for t in (q, k, v))
    i_pre = i_pre.reshape(batch, heads, n_chunks, chunk)
    b = torch.cumsum(F.logsigmoid(f_pre).reshape(batch, heads, n_chunks, chunk), dim=-1)
    g = b[..., -1]                                                        # whole-chunk log decay

    # What each chunk adds to the memory, stabilised by its own max.
    to_end = g.unsqueeze(-1) - b + i_pre                                  # log weight of token s at chunk end
    local_max = to_end.max(dim=-1).values
    w = torch.exp(to_end - local_max.unsqueeze(-1))
    local_C = torch.einsum("bhcs,bhcsd,bhcse->bhcde", w, k, v)
    local_n = torch.einsum("bhcs,bhcsd->bhcd", w, k)

    # Memory entering each chunk: an exclusive scan over chunks, by doubling (log2(chunks) steps).
    C_in, n_in, m_in = _entering_memory(g, local_C, local_n, local_max)

    # Per token: intra-chunk weights and the decayed entering memory, under one stabiliser.
    log_intra = b.unsqueeze(-1) - b.unsqueeze(-2) + i_pre.unsqueeze(-2)   # (b, h, c, t, s)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    log_intra = log_intra.masked_fill(~causal, float("-inf"))
    log_inter = b + m_in.unsqueeze(-1)                                    # (b, h, c, t)
    m_t = torch.maximum(log_intra.max(dim=-1).values, log_inter)
    scores = torch.einsum("bhctd,bhcsd->bhcts", q, k) * torch.exp(log_intra - m_t.unsqueeze(-1))
    inter = torch.exp(log_inter - m_t)
    numerator = scores @ v + inter.unsqueeze(-1) * torch.einsum("bhctd,bhcde->bhcte", q, C_in)
    denominator = scores.sum(-1) + inter * torch.einsum("bhctd,bhcd->bhct", q, n_in)
    h = numerator / torch.maximum(denominator.abs(), torch.exp(-m_t)).unsqueeze(-1)
    return h.reshape(batch, heads, -1, d)[:, :, :length]


def recompute_peak_bytes(heads: int, head_dim: int, chunk_size: int, batch: int, length: int,
                         device_type: str = "cuda") -> float:
    """Peak bytes of recomputing and differentiating ``mlstm_chunkwise`` on a (batch, heads, length, head_dim)
    sequence in backward: what the recomputation saves, measured on the meta device, times
    ``BACKWARD_PEAK_OVER_SAVED`` of the device. It grows with the sequence (one checkpoint covers it whole)."""
    # Every tensor of the cell has the batch as its first axis, so one sample is measured.
    factor = BACKWARD_PEAK_OVER_SAVED["cuda" if device_type == "cuda" else "cpu"]
    return factor * batch * _recompute_saved_per_sample(heads, head_dim, chunk_size, length)


@lru_cache(maxsize=4096)
def _recompute_saved_per_sample(heads: int, head_dim: int, chunk_size: int, length: int) -> float:
    from autoseg.networks.memory import saved_bytes

    inputs = [torch.zeros(shape, device="meta", requires_grad=True)
              for shape in [(1, heads, length, head_dim)] * 3 + [(1, heads, length)] * 2]
    return saved_bytes(lambda *args: mlstm_chunkwise(*args, chunk_size), *inputs)


def _entering_memory(g, local_C, local_n, local_max):
    """(C, n, m) entering each chunk, the true memory being exp(m) * C.

    A chunk's update is linear: memory_after = exp(g) * memory_before + exp(local_max) * local.
    Two consecutive segments (decay A1, memory M1 at scale s1) then (A2, M2, s2) combine into
    decay A1 + A2 and memory exp(A2 + s1) M1 + exp(s2) M2, re-stabilised by its max exponent;
    the combination is associative, so a Hillis-Steele scan computes every prefix.
    """
    d = local_C.shape[-2]
    memory = torch.cat([local_C, local_n.unsqueeze(-1)], dim=-1)          # n rides as an extra column
    decay, scale = g, local_max
    n_chunks = g.shape[-1]
    offset = 1
    while offset < n_chunks:
        prev_decay, prev_scale, prev_memory = decay[..., :-offset], scale[..., :-offset], memory[:, :, :-offset]
        cur_decay, cur_scale, cur_memory = decay[..., offset:], scale[..., offset:], memory[:, :, offset:]
        new_scale = torch.maximum(cur_decay + prev_scale, cur_scale)
        old_w = torch.exp(cur_decay + prev_scale - new_scale)[..., None, None]
        new_w = torch.exp(cur_scale - new_scale)[..., None, None]
        memory = torch.cat([memory[:, :, :offset], old_w * prev_memory + new_w * cur_memory], dim=2)
        scale = torch.cat([scale[..., :offset], new_scale], dim=-1)
        decay = torch.cat([decay[..., :offset], prev_decay + cur_decay], dim=-1)
        offset *= 2
    # Exclusive: chunk c enters with the memory after chunk c-1; the first with an empty one.
    memory = torch.cat([torch.zeros_like(memory[:, :, :1]), memory[:, :, :-1]], dim=2)
    scale = torch.cat([torch.zeros_like(scale[..., :1]), scale[..., :-1]], dim=-1)
    return memory[..., :d], memory[..., d], scale


def mlstm_recurrent(q, k, v, i_pre, f_pre) -> torch.Tensor:
    """The stabilised recurrence one token at a time: slow, obviously right, for tests only."""
    batch, heads, length, d = q.shape
    k = k / math.sqrt(d)
    C = q.new_zeros(batch, heads, d, d)
    n = q.new_zeros(batch, heads, d)
    m = q.new_zeros(batch, heads)
    outputs = []
    for t in range(length):
        log_f = F.logsigmoid(f_pre[..., t])
        m_new = torch.maximum(log_f + m, i_pre[..., t])
        i_gate, f_gate = torch.exp(i_pre[..., t] - m_new), torch.exp(log_f + m - m_new)
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * k[..., t, :, None] * v[..., t, None, :]
        n = f_gate[..., None] * n + i_gate[..., None] * k[..., t, :]
        m = m_new
        numerator = torch.einsum("bhd,bhde->bhe", q[..., t, :], C)
        denominator = (q[..., t, :] * n).sum(-1).abs()
        outputs.append(numerator / torch.maximum(denominator, torch.exp(-m)).unsqueeze(-1))
    return torch.stack(outputs, dim=2)
