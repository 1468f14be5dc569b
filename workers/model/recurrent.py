"""The machinery GDN and KDA share: the causal short convolution and the gated delta rule over rows.

The delta rule, per head, with state S [dk, dv] in fp32:

    S = exp(g) * S            (g: one value per head for GDN, per key channel for KDA)
    u = beta * (v - S^T k)
    S = S + k u^T
    o = S^T (q * dk^-0.5)     (reads the state after the write)

with q and k L2-normalised. On a CPU, decode steps run the recurrence as
written and prefill runs its chunked form (the same sums regrouped into a few
matrix products per chunk, differentiable for training); on CUDA, fla's
kernels run instead (``kernels.py``), chunked for prefill and fused-recurrent
for decode.
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


def chunked_delta_rule(q, k, v, g, beta, state, scale: float, chunk: int = 32):
    """The gated delta rule of ``recurrent_delta_rule``, a chunk of tokens at a time (same shapes and result).

    Within a chunk that starts from state S0, with G_t = exp(cumulative g up to t) and
    D_ts = G_t / G_s (s <= t, never above 1, so nothing overflows):

        u_t = beta_t (v_t - S0^T (G_t k_t) - sum_{s<t} (k_t . D_ts k_s) u_s)    a unit lower-triangular solve
        o_t = S0^T (G_t q_t) + sum_{s<=t} (q_t . D_ts k_s) u_s
        S   = G_last S0 + sum_s (D_last,s k_s) u_s^T
    """
    per_channel = g.dim() == 4
    if not per_channel:
        g = g[..., None]  # one decay per head: broadcast over the key channels
    q, k, v, g, beta = (x.transpose(1, 2) for x in (q * scale, k, v, g, beta))  # [N, H, T, ...]
    tokens = q.shape[2]
    outputs = []
    for start in range(0, tokens, chunk):
        span = slice(start, min(start + chunk, tokens))
        qc, kc, vc, bc = q[:, :, span], k[:, :, span], v[:, :, span], beta[:, :, span]
        gc = g[:, :, span].cumsum(2)  # [N, H, C, dk or 1]
        size = qc.shape[2]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        # log D_ts for s <= t, -inf above the diagonal (exp gives 0 there)
        log_decay = torch.where(causal[:, :, None], gc[:, :, :, None, :] - gc[:, :, None, :, :], float("-inf"))
        if per_channel:
            decay = log_decay.exp()  # [N, H, C, C, dk]
            kk = torch.einsum("nhtc,nhsc,nhtsc->nhts", kc, kc, decay)
            qk = torch.einsum("nhtc,nhsc,nhtsc->nhts", qc, kc, decay)
        else:
            decay = log_decay[..., 0].exp()  # [N, H, C, C]
            kk = (kc @ kc.transpose(-1, -2)) * decay
            qk = (qc @ kc.transpose(-1, -2)) * decay
        grow = gc.exp()
        rhs = bc[..., None] * (vc - (kc * grow) @ state)
        system = bc[..., None] * kk.tril(-1) + torch.eye(size, dtype=q.dtype, device=q.device)
        u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        outputs.append((qc * grow) @ state + qk @ u)
        last = gc[:, :, -1:]  # [N, H, 1, dk or 1]
        state = last.exp().transpose(-1, -2) * state + (kc * (last - gc).exp()).transpose(-1, -2) @ u
    return torch.cat(outputs, dim=2).transpose(1, 2), state


def causal_conv(conv: DepthwiseConv, x: torch.Tensor, group: RowGroup, slot: int) -> torch.Tensor:
    """Run ``conv`` over each row's new tokens ``x`` [T, C], continuing from its cached history ``slot``."""
    history_shape = (conv.kernel - 1, x.shape[-1])
    if group.is_decode:
        if group.caches is None:
            history = x.new_zeros(len(group.rows), *history_shape)
        else:
            history = torch.stack([cache.conv[slot] for cache in group.caches])
        out, new_history = conv(x[:, None, :], history)
        if group.caches is not None:  # one multi-tensor copy (one launch on a GPU), not one per row
            torch._foreach_copy_([cache.conv[slot] for cache in group.caches], list(new_history.unbind(0)))
        return out[:, 0]
    length = group.dense_length
    if length is not None:
        rows = x.view(len(group.rows), length, x.shape[-1])
        return conv(rows, x.new_zeros(len(group.rows), *history_shape))[0].reshape(x.shape)
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
        length = group.dense_length
        if group.is_decode:
            out, final = recurrent_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], states, scale)
            out = out[:, 0]
        elif length is not None:
            rows = len(group.rows)
            out, final = chunked_delta_rule(*(x.reshape(rows, length, *x.shape[1:]) for x in (q, k, v, g, beta)),
                                            states, scale)
            out = out.reshape(-1, heads, dv)
        else:
            out = q.new_empty(q.shape[0], heads, dv)
            finals = []
            for r, row in enumerate(group.rows):
                span = slice(row.offset, row.offset + row.length)
                o, s = chunked_delta_rule(q[span][None], k[span][None], v[span][None], g[span][None],
                                            beta[span][None], states[r:r + 1], scale)
                out[span] = o[0]
                finals.append(s)
            final = torch.cat(finals)
    if group.caches is not None:  # one multi-tensor copy (one launch on a GPU), not one per row
        torch._foreach_copy_([cache.state for cache in group.caches], list(final.unbind(0)))
    return out
