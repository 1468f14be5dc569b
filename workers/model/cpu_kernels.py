"""Decode kernels for the CPU (numba): they read and write the cache arena in place, as the GPU kernels do.

A decode step on a CPU is a few hundred small operations. The plain-torch path
gathers every row's pages or states into one dense batch first (a copy of all of
them, every step) and scatters the states back; these loops instead follow each
row's block table or state block straight into the arena, like the Triton
kernels, and are checked against the plain-torch path
(``tests/unit/model/test_cpu_kernels.py``). fp32 only (numpy has no bfloat16):
other dtypes take the plain-torch path. ``bench/decode_ops.py --kernels`` puts
the two side by side.

Arena addressing (``workers/model/cache.py``), the arena's bytes seen as fp32
``[num_blocks, block_bytes / 4]``: an attention page's key of kv head h, slot t,
dim d at ``[block, (h * page + t) * D + d]``, its value ``value_offset`` further; a
recurrent block's state [heads, dk, dv] from 0, a conv history [kernel - 1,
channels] at its offset. ``cache=True`` keeps the compiled code on disk beside
this file; ``fastmath`` lets the dot products vectorise (sums reassociate: the
results match the plain-torch path to fp32 rounding, not bit for bit).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from workers.model.layers import fp32

_jit = numba.njit(cache=True, nogil=True, fastmath=True)
NO_WINDOW = 1 << 62


@numba.njit(cache=True, fastmath=True, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for d in range(a.shape[0]):
        s += a[d] * b[d]
    return s

@numba.njit(cache=True, fastmath=True, inline="always")
def _axpy(w, x, into):
    for d in range(x.shape[0]):
        into[d] += w * x[d]

@_jit
def _paged_decode(q, arena, words, kv_heads, page, value_offset, pages, rings, layer, table_rows, positions, window,
                  scale, out):
    """``arena``: the fp32 words as one flat array, ``words`` per block. Keys and values are read as 1-D
    slices of it (contiguous: the dot products and updates over a head's dims vectorise)."""
    rows, heads, size = q.shape
    group = heads // kv_heads
    acc = np.empty((group, size), dtype=np.float32)
    for r in range(rows):
        position, table = positions[r], table_rows[r]
        ring = rings[table, layer]
        slots = min(position + 1, ring)  # slots holding a token (all of them once a ring has wrapped)
        newest = position % ring  # the slot the row's new token went to
        num_pages = (slots + page - 1) // page
        scores = np.empty((group, slots), dtype=np.float32)
        for kv in range(kv_heads):  # the kv head's ``group`` query heads read each key once
            queries = q[r, kv * group:(kv + 1) * group]
            start = kv * page * size  # a kv head's page is one run of [page, size] (head-major)
            for p in range(num_pages):  # page by page: no division or modulo per slot
                first = p * page
                base = pages[table, layer, p] * words + start
                for t in range(min(page, slots - first)):
                    j = first + t
                    back = newest - j  # how many tokens before the new one slot j's token is
                    if back < 0:
                        back += ring
                    key = arena[base + t * size:base + (t + 1) * size]
                    for g in range(group):
                        scores[g, j] = _dot(queries[g], key) * scale if back < window else -np.inf
            for g in range(group):
                best, total = scores[g].max(), np.float32(0.0)
                for j in range(slots):
                    w = np.float32(math.exp(scores[g, j] - best))
                    scores[g, j] = w
                    total += w
                scores[g] /= total
            acc[:] = 0.0
            for p in range(num_pages):
                first = p * page
                base = pages[table, layer, p] * words + start + value_offset
                for t in range(min(page, slots - first)):
                    j = first + t
                    value = arena[base + t * size:base + (t + 1) * size]
                    for g in range(group):
                        _axpy(scores[g, j], value, acc[g])
            out[r, kv * group:(kv + 1) * group] = acc

@_jit
def _delta_rule_decode(q, k, v, g, beta, arena, blocks, scale, out):
    rows, heads, dk = q.shape
    dv = v.shape[2]
    per_channel = g.shape[2] != 1
    u = np.empty(dv, dtype=np.float32)
    for r in range(rows):
        for h in range(heads):
            qh, kh = q[r, h], k[r, h]
            qq, kk = np.float32(0.0), np.float32(0.0)
            for i in range(dk):
                qq += qh[i] * qh[i]
                kk += kh[i] * kh[i]
            qn, kn = np.float32(1.0 / math.sqrt(qq + 1e-6)), np.float32(1.0 / math.sqrt(kk + 1e-6))  # fla's L2 norm
            state = arena[blocks[r], h * dk * dv:][:dk * dv]  # [dk, dv], row-major
            u[:] = 0.0  # S^T k with the decayed state ...
            for i in range(dk):
                decay = np.float32(math.exp(g[r, h, i if per_channel else 0]))
                ki, row = kh[i] * kn, state[i * dv:(i + 1) * dv]
                for j in range(dv):
                    s = row[j] * decay
                    row[j] = s
                    u[j] += ki * s
            vh, b = v[r, h], beta[r, h]
            for j in range(dv):  # ... then u = beta (v - S^T k)
                u[j] = b * (vh[j] - u[j])
            o = out[r, h]
            o[:] = 0.0
            for i in range(dk):  # S += k u^T, and o = S^T (q * scale) with the updated state
                ki, qi, row = kh[i] * kn, qh[i] * qn * scale, state[i * dv:(i + 1) * dv]
                for j in range(dv):
                    s = row[j] + ki * u[j]
                    row[j] = s
                    o[j] += qi * s


@_jit
def _conv_decode(x, arena, offset, kernel, blocks, weight, out):
    rows, channels = x.shape
    history = kernel - 1
    for r in range(rows):
        past = arena[blocks[r], offset:][:history * channels]  # [kernel - 1, channels], oldest first
        xr, o = x[r], out[r]
        tap = weight[history]
        for c in range(channels):
            o[c] = xr[c] * tap[c]  # the last tap multiplies the current token
        for j in range(history):
            tap, at = weight[j], j * channels
            for c in range(channels):
                o[c] += past[at + c] * tap[c]
        for j in range(history - 1):  # shift the history by one token
            at = j * channels
            for c in range(channels):
                past[at + c] = past[at + channels + c]
        at = (history - 1) * channels
        for c in range(channels):
            past[at + c] = xr[c]


def _np(x: torch.Tensor) -> np.ndarray:
    """The same memory as a numpy array (each call dispatches a few ops: convert once per kernel input)."""
    return (x if x.is_contiguous() else x.contiguous()).numpy()


def _taps(conv) -> np.ndarray:
    """A conv's weight as [kernel, channels] (contiguous), made once per weight version."""
    weight = conv.weight
    key = (weight.data_ptr(), weight._version)
    cached = getattr(conv, "_cpu_taps", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach()[:, 0, :].t().contiguous().numpy())
        conv._cpu_taps = cached
    return cached[1]


class CpuKernels:
    """The ``SupernetLM.use_kernels`` object of an fp32 model on a CPU: decode rows only (prefill rows and
    uncached batches run the plain-torch path)."""

    name = "numba"

    def supports(self, group) -> bool:
        cache = group.cache  # (the loops follow host-side rows: not a captured batch's device buffers)
        return cache is not None and cache.host_rows and cache.arena.dtype == torch.float32

    def paged_decode(self, q: torch.Tensor, group, shape, pages, window: int | None, scale: float) -> torch.Tensor:
        """The group's one-token rows (already written) over their pages; q [rows, heads, D] -> same."""
        arena, tables = group.cache.arena, group.cache.tables
        table_rows, positions = group.decode_host()
        out = torch.empty_like(q)
        words = arena.numpy_f32()
        _paged_decode(_np(q), words.reshape(-1), words.shape[1], pages.keys.shape[1], arena.page_tokens,
                      pages.value_offset,
                      tables.pages_host, tables.rings_host, group.layer, table_rows, positions,
                      NO_WINDOW if window is None else window, np.float32(scale), out.numpy())
        return out

    def delta_rule_decode(self, q, k, v, g, beta, group, slots, scale: float) -> torch.Tensor:
        """The group's one-token rows, each state updated in place in its block; o [rows, H, dv] fp32."""
        out = torch.empty(q.shape[0], v.shape[1], v.shape[2], dtype=torch.float32)
        gate = g[..., None] if g.dim() == 2 else g
        _delta_rule_decode(_np(fp32(q)), _np(fp32(k)), _np(fp32(v)), _np(fp32(gate)), _np(fp32(beta)),
                           group.cache.arena.numpy_f32(), group.decode_blocks_host(), np.float32(scale), out.numpy())
        return out

    def conv_decode(self, conv, x: torch.Tensor, group, slots, index: int) -> torch.Tensor:
        """The group's one-token rows through ``conv``, continuing from (and shifting) history ``index``."""
        out = torch.empty_like(x)
        _conv_decode(_np(x), group.cache.arena.numpy_f32(), slots.conv_offsets[index], conv.kernel,
                     group.decode_blocks_host(), _taps(conv), out.numpy())
        return out
