"""The machinery GDN and KDA share: the causal short convolution and the gated delta rule over rows.

The delta rule, per head, with state S [dk, dv] in fp32:

    S = exp(g) * S            (g: one value per head for GDN, per key channel for KDA)
    u = beta * (v - S^T k)
    S = S + k u^T
    o = S^T (q * dk^-0.5)     (reads the state after the write)

with q and k L2-normalised. On a CPU this runs as a plain-torch loop over
tokens; on CUDA, fla's kernels run instead (``kernels.py``), chunked for
prefill and fused-recurrent for decode.
"""

from __future__ import annotations

import torch

from workers.model.batch import RowGroup
from workers.model.layers import DepthwiseConv, l2_normalize


def recurrent_delta_rule(q, k, v, g, beta, state, scale: float):
    """Token-by-token gated delta rule.

    q, k: [N, T, H, dk] (L2-normalised), v: [N, T, H, dv], g: [N, T, H] or [N, T, H, dk] (log decay),
    beta: [N, T, H], state: [N, H, dk, dv]; all fp32. Returns (o [N, T, H, dv], final state).
    """
    per_channel = g.dim() == 4
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for t in range(q.shape[1]):
        decay = g[:, t].exp()
        state = state * (decay[..., None] if per_channel else decay[..., None, None])
        k_t = k[:, t]
        update = beta[:, t, :, None] * (v[:, t] - torch.einsum("nhk,nhkv->nhv", k_t, state))
        state = state + k_t[..., None] * update[..., None, :]
        out[:, t] = torch.einsum("nhk,nhkv->nhv", q[:, t] * scale, state)
    return out, state


def causal_conv(conv: DepthwiseConv, x: torch.Tensor, group: RowGroup, slot: int) -> torch.Tensor:
    """Run ``conv`` over each row's new tokens ``x`` [T, C], continuing from its cached history ``slot``."""
    history_shape = (conv.kernel - 1, x.shape[-1])
    if group.is_decode:
        if group.caches is None:
            history = x.new_zeros(len(group.rows), *history_shape)
        else:
            history = torch.stack([cache.conv[slot] for cache in group.caches])
        out, new_history = conv(x[:, None, :], history)
        if group.caches is not None:
            for cache, h in zip(group.caches, new_history):
                cache.conv[slot].copy_(h)
        return out[:, 0]
    out = torch.empty_like(x)
    for r, row in enumerate(group.rows):
        span = slice(row.offset, row.offset + row.length)
        cache = None if group.caches is None else group.caches[r]
        history = x.new_zeros(history_shape) if cache is None else cache.conv[slot]
        y, new_history = conv(x[span][None], history[None])
        out[span] = y[0]
        if cache is not None:
            cache.conv[slot].copy_(new_history[0])
    return out


def delta_rule(q, k, v, g, beta, group: RowGroup, kernels=None) -> torch.Tensor:
    """Run the gated delta rule for every row of ``group``, continuing from and updating cached states.

    q, k: [T, H, dk] (not yet normalised), v: [T, H, dv], g: [T, H] or [T, H, dk], beta: [T, H].
    Returns o [T, H, dv] in fp32.
    """
    heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    scale = dk**-0.5
    if group.caches is None:
        states = q.new_zeros(len(group.rows), heads, dk, dv, dtype=torch.float32)
    else:
        states = torch.stack([cache.state for cache in group.caches])
    if kernels is not None:
        out, final = kernels.delta_rule(q, k, v, g, beta, states, group, scale)
    else:
        q, k = l2_normalize(q.float()), l2_normalize(k.float())
        v, g, beta = v.float(), g.float(), beta.float()
        if group.is_decode:
            out, final = recurrent_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], states, scale)
            out = out[:, 0]
        else:
            out = q.new_empty(q.shape[0], heads, dv)
            finals = []
            for r, row in enumerate(group.rows):
                span = slice(row.offset, row.offset + row.length)
                o, s = recurrent_delta_rule(q[span][None], k[span][None], v[span][None], g[span][None],
                                            beta[span][None], states[r:r + 1], scale)
                out[span] = o[0]
                finals.append(s)
            final = torch.cat(finals)
    if group.caches is not None:
        for cache, s in zip(group.caches, final):
            cache.state.copy_(s)
    return out
