"""The machinery GDN and KDA share: the causal short convolution and the gated delta rule over rows.

The delta rule, per head, with state S [dk, dv] in fp32:

    S = exp(g) * S            (g: one value per head for GDN, per key channel for KDA)
    u = beta * (v - S^T k)
    S = S + k u^T
    o = S^T (q * dk^-0.5)     (reads the state after the write)

with q and k L2-normalised. On a CPU, decode steps run the recurrence as
written and prefill runs its chunked form (the same sums regrouped into a few
matrix products per chunk, differentiable for training); with kernels
(``kernels.py``), decode rows update their states in place (numba on a CPU,
Triton on CUDA) and on CUDA rows of several tokens run fla's chunked kernels.

With a cache, each row's state and conv histories live in its block of the
engine's pool (``StateSlots``: views [num_blocks, ...] of the arena). One-token
rows are gathered by block id, updated as one batch and written back with one
``index_put_`` (the kernels read and write the slots in place instead); rows of
several tokens run one by one from their own block (fla: in one call).
"""

from __future__ import annotations

import torch

from workers.model.batch import RowGroup
from workers.model.cache import StateSlots
from workers.model.layers import DepthwiseConv, fp32, l2_normalize


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


def causal_conv(conv: DepthwiseConv, x: torch.Tensor, group: RowGroup, slots: StateSlots | None, index: int = 0,
                kernels=None) -> torch.Tensor:
    """Run ``conv`` over each row's new tokens ``x`` [T, C], continuing from its cached history.

    ``slots``: the mixer's view of the pool (None without a cache); ``index``: which of its conv histories.
    """
    if slots is None:
        return _conv_from_zero(conv, x, group)
    rows, history = group.set, slots.conv[index]
    in_place = kernels is not None and kernels.supports(group)
    if rows.is_decode and in_place:
        return kernels.conv_decode(conv, x, group, slots, index)
    blocks = group.blocks()
    if rows.is_decode:
        out, new_history = conv(x[:, None, :], history[blocks])
        history.index_put_((blocks,), new_history)
        return out[:, 0]
    out = torch.empty_like(x)
    if rows.num_decode:
        tokens = rows.decode_tokens
        if in_place:
            out[tokens] = kernels.conv_decode(conv, x[tokens], group, slots, index)
        else:
            decode_blocks = blocks[rows.decode_rows]
            y, new_history = conv(x[tokens][:, None, :], history[decode_blocks])
            out[tokens] = y[:, 0]
            history.index_put_((decode_blocks,), new_history)
    for r in rows.prefill:
        row, block = rows.rows[r], blocks[r:r + 1]
        span = slice(row.offset, row.offset + row.length)
        y, new_history = conv(x[span][None], history[block])
        out[span] = y[0]
        history.index_put_((block,), new_history)
    return out


def _conv_from_zero(conv: DepthwiseConv, x: torch.Tensor, group: RowGroup) -> torch.Tensor:
    """No cache: every row starts from an empty history (training, scoring, full recompute)."""
    history_shape = (conv.kernel - 1, x.shape[-1])
    if group.is_decode:
        return conv(x[:, None, :], x.new_zeros(len(group.rows), *history_shape))[0][:, 0]
    length = group.dense_length
    if length is not None:
        rows = x.view(len(group.rows), length, x.shape[-1])
        return conv(rows, x.new_zeros(len(group.rows), *history_shape))[0].reshape(x.shape)
    out = torch.empty_like(x)
    for row in group.rows:
        span = slice(row.offset, row.offset + row.length)
        out[span] = conv(x[span][None], x.new_zeros(1, *history_shape))[0][0]
    return out


def delta_rule(q, k, v, g, beta, group: RowGroup, slots: StateSlots | None, kernels=None) -> torch.Tensor:
    """Run the gated delta rule for every row of ``group``, continuing from and updating its cached state.

    q, k: [T, H, dk] (not yet normalised), v: [T, H, dv], g: [T, H] or [T, H, dk], beta: [T, H];
    ``slots``: the mixer's view of the pool (None: start from zero, keep nothing). Returns o [T, H, dv] in fp32.
    """
    heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    scale = dk**-0.5
    rows = group.set
    chunk = getattr(kernels, "delta_rule_chunk", None)  # fla's chunked kernels (CUDA only)
    if slots is not None and kernels is not None and kernels.supports(group) and rows.num_decode:
        if rows.is_decode:
            return kernels.delta_rule_decode(q, k, v, g, beta, group, slots, scale)
        out = q.new_empty(q.shape[0], heads, dv, dtype=torch.float32)
        tokens = rows.decode_tokens
        out[tokens] = kernels.delta_rule_decode(q[tokens], k[tokens], v[tokens], g[tokens], beta[tokens], group, slots,
                                                scale)
        if chunk is not None and chunk(q, k, v, g, beta, group, slots, scale, out) is not None:
            return out
        return _prefill_rows(q, k, v, g, beta, group, slots, scale, out)
    if chunk is not None and not rows.is_decode:  # prefill rows only, or no cache at all
        out = q.new_empty(q.shape[0], heads, dv, dtype=torch.float32)
        if chunk(q, k, v, g, beta, group, slots, scale, out) is not None:
            return out
    states = None if slots is None else slots.state
    blocks = None if states is None else group.blocks()
    q, k = l2_normalize(fp32(q)), l2_normalize(fp32(k))
    v, g, beta = fp32(v), fp32(g), fp32(beta)
    if states is None:
        zeros = q.new_zeros(len(rows.rows), heads, dk, dv)
        length = group.dense_length
        if rows.is_decode:
            return recurrent_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], zeros, scale)[0][:, 0]
        if length is not None:
            n = len(rows.rows)
            out, _ = chunked_delta_rule(*(x.reshape(n, length, *x.shape[1:]) for x in (q, k, v, g, beta)), zeros, scale)
            return out.reshape(-1, heads, dv)
    if rows.is_decode:
        out, final = recurrent_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                          states[blocks], scale)
        states.index_put_((blocks,), final)
        return out[:, 0]
    out = q.new_empty(q.shape[0], heads, dv)
    if states is not None and rows.num_decode:
        tokens, decode_blocks = rows.decode_tokens, blocks[rows.decode_rows]
        o, final = recurrent_delta_rule(*(x[tokens][:, None] for x in (q, k, v, g, beta)), states[decode_blocks], scale)
        out[tokens] = o[:, 0]
        states.index_put_((decode_blocks,), final)
    return _prefill_rows(q, k, v, g, beta, group, slots, scale, out, normalised=True)


def _prefill_rows(q, k, v, g, beta, group: RowGroup, slots: StateSlots | None, scale: float, out: torch.Tensor,
                  normalised: bool = False) -> torch.Tensor:
    """Rows of several tokens (every row without a cache), one by one from their own state, into ``out``."""
    rows, heads, dk, dv = group.set, q.shape[1], q.shape[2], v.shape[2]
    if not normalised:
        q, k = l2_normalize(fp32(q)), l2_normalize(fp32(k))
        v, g, beta = fp32(v), fp32(g), fp32(beta)
    states = None if slots is None else slots.state
    blocks = None if states is None else group.blocks()
    for r in (rows.prefill if states is not None else range(len(rows.rows))):
        row = rows.rows[r]
        span = slice(row.offset, row.offset + row.length)
        initial = q.new_zeros(1, heads, dk, dv) if states is None else states[blocks[r:r + 1]]
        o, final = chunked_delta_rule(q[span][None], k[span][None], v[span][None], g[span][None], beta[span][None],
                                      initial, scale)
        out[span] = o[0]
        if states is not None:
            states.index_put_((blocks[r:r + 1],), final)
    return out
