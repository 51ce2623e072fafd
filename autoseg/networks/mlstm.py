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
* between chunks, the matrix memory (d x d per head) is carried by a loop over *chunks*
  (not tokens), and each token reads it with its decay exp(b_t).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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

    # Carry (C, n, m) across chunks; m starts at 0 with an empty memory (any start works).
    C = q.new_zeros(batch, heads, d, d)
    n = q.new_zeros(batch, heads, d)
    m = q.new_zeros(batch, heads)
    entering_C, entering_n, entering_m = [], [], []
    for c in range(n_chunks):
        entering_C.append(C), entering_n.append(n), entering_m.append(m)
        m_new = torch.maximum(g[..., c] + m, local_max[..., c])
        old, new = torch.exp(g[..., c] + m - m_new), torch.exp(local_max[..., c] - m_new)
        C = old[..., None, None] * C + new[..., None, None] * local_C[:, :, c]
        n = old[..., None] * n + new[..., None] * local_n[:, :, c]
        m = m_new
    C_in, n_in, m_in = (torch.stack(t, dim=2) for t in (entering_C, entering_n, entering_m))

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
