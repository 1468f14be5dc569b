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

@numba.njit(cache=True, fastmath=True, inline="always")
def _attend_row(queries, arena, words, kv_heads, page, value_offset, pages, table, layer, ring, position, window,
                scale, acc, out):
    """One row's new token (already written) over its pages: ``queries`` [heads, size] -> ``out`` [heads, size].
    ``arena``: the fp32 words as one flat array, ``words`` per block; keys and values are read as 1-D slices
    of it (contiguous: the dot products and updates over a head's dims vectorise)."""
    heads, size = queries.shape
    group = heads // kv_heads
    slots = min(position + 1, ring)  # slots holding a token (all of them once a ring has wrapped)
    newest = position % ring  # the slot the new token went to
    num_pages = (slots + page - 1) // page
    scores = np.empty((group, slots), dtype=np.float32)
    for kv in range(kv_heads):  # the kv head's ``group`` query heads read each key once
        grouped = queries[kv * group:(kv + 1) * group]
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
                    scores[g, j] = _dot(grouped[g], key) * scale if back < window else -np.inf
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
        out[kv * group:(kv + 1) * group] = acc


@_jit
def _paged_decode(q, arena, words, kv_heads, page, value_offset, pages, rings, layer, table_rows, positions, window,
                  scale, out):
    rows, heads, size = q.shape
    acc = np.empty((heads // kv_heads, size), dtype=np.float32)
    for r in range(rows):
        table = table_rows[r]
        _attend_row(q[r], arena, words, kv_heads, page, value_offset, pages, table, layer, rings[table, layer],
                    positions[r], window, scale, acc, out[r])


@numba.njit(cache=True, fastmath=True, inline="always")
def _rotate(x, cos, signed_sin, out):
    """Rotary.apply for one head: x * cos + roll(x, size / 2) * signed_sin."""
    size = x.shape[0]
    half = size // 2
    for d in range(size):
        out[d] = x[d] * cos[d] + x[(d + half) % size] * signed_sin[d]


@_jit
def _attention_decode(qkv, cos, signed_sin, arena, words, kv_heads, page, value_offset, pages, rings, layer,
                      table_rows, positions, window, scale, out):
    """Attention for one-token rows from their projections ``qkv`` [rows, (heads + 2 kv_heads) * size]: rotary
    on q and k, the new key and value written to their page slot, then ``_attend_row`` into ``out``
    [rows, heads, size]."""
    rows, heads, size = out.shape
    keys, values = heads * size, (heads + kv_heads) * size  # where k and v start in a row of qkv
    rotated = np.empty((heads, size), dtype=np.float32)
    acc = np.empty((heads // kv_heads, size), dtype=np.float32)
    for r in range(rows):
        table, position = table_rows[r], positions[r]
        ring = rings[table, layer]
        slot = position % ring
        block = pages[table, layer, slot // page]
        row = qkv[r]
        for h in range(kv_heads):
            at = block * words + (h * page + slot % page) * size
            _rotate(row[keys + h * size:keys + (h + 1) * size], cos[r], signed_sin[r], arena[at:at + size])
            arena[value_offset + at:value_offset + at + size] = row[values + h * size:values + (h + 1) * size]
        for h in range(heads):
            _rotate(row[h * size:(h + 1) * size], cos[r], signed_sin[r], rotated[h])
        _attend_row(rotated, arena, words, kv_heads, page, value_offset, pages, table, layer, ring, position, window,
                    scale, acc, out[r])


_inline = numba.njit(cache=True, fastmath=True, inline="always")


@_inline
def _delta_rule_head(qh, kh, vh, decay, beta, state, scale, u, o):
    """One head's step, the state [dk * dv] (row-major) updated in place, o [dv] written; ``decay`` [dk]
    (KDA) or [1] (GDN: one value for the head). q and k are L2-normalised here (fla's in-kernel norm)."""
    dk, dv = qh.shape[0], vh.shape[0]
    per_channel = decay.shape[0] != 1
    qq, kk = np.float32(0.0), np.float32(0.0)
    for i in range(dk):
        qq += qh[i] * qh[i]
        kk += kh[i] * kh[i]
    qn, kn = np.float32(1.0 / math.sqrt(qq + 1e-6)), np.float32(1.0 / math.sqrt(kk + 1e-6))
    u[:] = 0.0  # S^T k with the decayed state ...
    for i in range(dk):
        ki, row, d = kh[i] * kn, state[i * dv:(i + 1) * dv], decay[i if per_channel else 0]
        for j in range(dv):
            x = row[j] * d
            row[j] = x
            u[j] += ki * x
    for j in range(dv):  # ... then u = beta (v - S^T k)
        u[j] = beta * (vh[j] - u[j])
    o[:] = 0.0
    for i in range(dk):  # S += k u^T, and o = S^T (q * scale) with the updated state
        ki, qi, row = kh[i] * kn, qh[i] * qn * scale, state[i * dv:(i + 1) * dv]
        for j in range(dv):
            x = row[j] + ki * u[j]
            row[j] = x
            o[j] += qi * x


@_inline
def _conv_step(x, past, taps, out):
    """One token ``x`` [channels] through a causal depthwise conv whose history ``past`` [(kernel-1) * channels]
    (oldest first) shifts by one token in place; ``taps`` [kernel, channels], the last for the current token."""
    channels, history = x.shape[0], taps.shape[0] - 1
    tap = taps[history]
    for c in range(channels):
        out[c] = x[c] * tap[c]
    for j in range(history):
        tap, at = taps[j], j * channels
        for c in range(channels):
            out[c] += past[at + c] * tap[c]
    for j in range(history - 1):
        at = j * channels
        for c in range(channels):
            past[at + c] = past[at + channels + c]
    at = (history - 1) * channels
    for c in range(channels):
        past[at + c] = x[c]


@_inline
def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x)))


@_inline
def _softplus(x):  # torch's: linear above 20
    return x if x > 20.0 else np.float32(math.log1p(math.exp(x)))


@_inline
def _gated_norm(o, gate, weight, eps, sigmoid_gate, out):
    """GatedRMSNorm: o * rsqrt(mean(o^2) + eps) * weight * act(gate), act silu or sigmoid."""
    size = o.shape[0]
    total = np.float32(0.0)
    for d in range(size):
        total += o[d] * o[d]
    inv = np.float32(1.0 / math.sqrt(total / size + eps))
    for d in range(size):
        act = _sigmoid(gate[d]) if sigmoid_gate else gate[d] * _sigmoid(gate[d])
        out[d] = o[d] * inv * weight[d] * act


@_jit
def _delta_rule_decode(q, k, v, g, beta, arena, blocks, scale, out):
    rows, heads, dk = q.shape
    dv = v.shape[2]
    u = np.empty(dv, dtype=np.float32)
    decay = np.empty(g.shape[2], dtype=np.float32)
    for r in range(rows):
        for h in range(heads):
            for i in range(decay.shape[0]):
                decay[i] = math.exp(g[r, h, i])
            state = arena[blocks[r], h * dk * dv:][:dk * dv]  # [dk, dv], row-major
            _delta_rule_head(q[r, h], k[r, h], v[r, h], decay, beta[r, h], state, scale, u, out[r, h])


@_jit
def _conv_decode(x, arena, offset, kernel, blocks, weight, out):
    rows, channels = x.shape
    for r in range(rows):
        _conv_step(x[r], arena[blocks[r], offset:][:(kernel - 1) * channels], weight, out[r])


@_jit
def _gdn_decode(projected, arena, blocks, conv_offset, taps, key_heads, value_heads, dk, dv, a_log, dt_bias,
                norm_weight, eps, scale, out):
    """GDN after its input projections ``projected`` [rows, q | k | v | z | b | a], one token per row: conv +
    SiLU over q|k|v, the gates, the delta rule (value head h reads key head h // (HV / HK)), and the gated
    norm by z; ``out`` [rows, HV * dv]."""
    rows = projected.shape[0]
    key_dim, conv_dim = key_heads * dk, 2 * key_heads * dk + value_heads * dv
    gates = conv_dim + value_heads * dv  # b then a
    repeat = value_heads // key_heads
    mixed = np.empty(conv_dim, dtype=np.float32)
    u, o, decay = np.empty(dv, dtype=np.float32), np.empty(dv, dtype=np.float32), np.empty(1, dtype=np.float32)
    for r in range(rows):
        block = blocks[r]
        row = projected[r]
        _conv_step(row[:conv_dim], arena[block, conv_offset:][:(taps.shape[0] - 1) * conv_dim], taps, mixed)
        for c in range(conv_dim):
            mixed[c] = mixed[c] * _sigmoid(mixed[c])
        for h in range(value_heads):
            key = (h // repeat) * dk
            beta = _sigmoid(row[gates + h])
            decay[0] = math.exp(-math.exp(a_log[h]) * _softplus(row[gates + value_heads + h] + dt_bias[h]))
            state = arena[block, h * dk * dv:][:dk * dv]
            _delta_rule_head(mixed[key:key + dk], mixed[key_dim + key:key_dim + key + dk],
                             mixed[2 * key_dim + h * dv:2 * key_dim + (h + 1) * dv], decay, beta, state, scale, u, o)
            _gated_norm(o, row[conv_dim + h * dv:conv_dim + (h + 1) * dv], norm_weight, eps, False,
                        out[r, h * dv:(h + 1) * dv])


@_jit
def _kda_decode(projected, f, gate, arena, blocks, conv_offsets, q_taps, k_taps, v_taps, heads, dim, a_log,
                dt_bias, norm_weight, eps, sigmoid_gate, scale, out):
    """KDA after its projections (``projected`` [rows, q | k | v | beta | ...], ``f`` and ``gate`` [rows, size]),
    one token per row: conv + SiLU of q, k, v, the per-channel gates, the delta rule and the gated norm;
    ``out`` [rows, heads * dim]."""
    rows, size = f.shape
    history = (q_taps.shape[0] - 1) * size
    qc, kc, vc = np.empty(size, dtype=np.float32), np.empty(size, dtype=np.float32), np.empty(size, dtype=np.float32)
    u, o, decay = np.empty(dim, dtype=np.float32), np.empty(dim, dtype=np.float32), np.empty(dim, dtype=np.float32)
    for r in range(rows):
        block = blocks[r]
        row = projected[r]
        _conv_step(row[:size], arena[block, conv_offsets[0]:][:history], q_taps, qc)
        _conv_step(row[size:2 * size], arena[block, conv_offsets[1]:][:history], k_taps, kc)
        _conv_step(row[2 * size:3 * size], arena[block, conv_offsets[2]:][:history], v_taps, vc)
        for c in range(size):
            qc[c] = qc[c] * _sigmoid(qc[c])
            kc[c] = kc[c] * _sigmoid(kc[c])
            vc[c] = vc[c] * _sigmoid(vc[c])
        for h in range(heads):
            at, rate = h * dim, -math.exp(a_log[h])
            for i in range(dim):
                decay[i] = math.exp(rate * _softplus(f[r, at + i] + dt_bias[at + i]))
            state = arena[block, h * dim * dim:][:dim * dim]
            _delta_rule_head(qc[at:at + dim], kc[at:at + dim], vc[at:at + dim], decay, _sigmoid(row[3 * size + h]), state,
                             scale, u, o)
            _gated_norm(o, gate[r, at:at + dim], norm_weight, eps, sigmoid_gate, out[r, at:at + dim])


def _np(x: torch.Tensor) -> np.ndarray:
    """The same memory as a numpy array (each call dispatches a few ops: convert once per kernel input)."""
    return (x if x.is_contiguous() else x.contiguous()).numpy()


def _step_np(group, tensor: torch.Tensor) -> np.ndarray:
    """A tensor the step keeps for all its layers (a row set's rotary cos/sin) as numpy, converted once."""
    memo, key = group.cache.memo, ("numpy", id(tensor))
    found = memo.get(key)
    if found is None:
        found = memo[key] = (tensor, _np(tensor))  # (holding the tensor keeps its id unique for the step)
    return found[1]


def _host(module, name: str, make) -> np.ndarray:
    """``make(module)`` as numpy, made once per version of the module's weights (cached on the module)."""
    weight = module.weight if hasattr(module, "weight") else None
    key = (name, None if weight is None else (weight.data_ptr(), weight._version))
    cache = module.__dict__.setdefault("_cpu_arrays", {})
    found = cache.get(name)
    if found is None or found[0] != key:
        with torch.no_grad():
            found = cache[name] = (key, np.ascontiguousarray(make(module).detach().numpy()))
    return found[1]


def _taps(conv) -> np.ndarray:
    """A conv's weight as [kernel, channels] (contiguous)."""
    return _host(conv, "taps", lambda c: c.weight[:, 0, :].t())


def _gates(mixer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GDN/KDA mixer's A_log, dt_bias and norm weight (fp32, flat), made once per version of them."""
    versions = tuple((p.data_ptr(), p._version) for p in (mixer.A_log, mixer.dt_bias, mixer.norm.weight))
    cached = mixer.__dict__.get("_cpu_gates")
    if cached is None or cached[0] != versions:
        arrays = tuple(np.ascontiguousarray(p.detach().float().reshape(-1).numpy())
                       for p in (mixer.A_log, mixer.dt_bias, mixer.norm.weight))
        cached = mixer.__dict__["_cpu_gates"] = (versions, arrays)
    return cached[1]


class CpuKernels:
    """The ``SupernetLM.use_kernels`` object of an fp32 model on a CPU: decode rows only (prefill rows and
    uncached batches run the plain-torch path)."""

    name = "numba"

    def supports(self, group) -> bool:
        cache = group.cache  # (the loops follow host-side rows: not a captured batch's device buffers)
        return cache is not None and cache.host_rows and cache.arena.dtype == torch.float32

    def attention_decode(self, qkv, heads: int, cos, signed_sin, group, pages, window: int | None,
                         scale: float) -> torch.Tensor:
        """``Attention`` for the group's one-token rows from their projections (rotary, cache write and decode in
        one call): qkv [rows, (heads + 2 kv_heads) * D], cos/sin the rows' [rows, D] -> [rows, heads, D]."""
        arena, tables = group.cache.arena, group.cache.tables
        table_rows, positions = group.decode_host()
        out = qkv.new_empty(qkv.shape[0], heads, pages.keys.shape[3])
        words = arena.numpy_f32()
        _attention_decode(_np(qkv), _step_np(group, cos), _step_np(group, signed_sin),
                          words.reshape(-1), words.shape[1], pages.keys.shape[1], arena.page_tokens, pages.value_offset,
                          tables.pages_host, tables.rings_host, group.layer, table_rows, positions,
                          NO_WINDOW if window is None else window, np.float32(scale), out.numpy())
        return out

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

    # ---- whole mixers after their input projections (decode groups): one call instead of ~40 small ops ----

    def gdn_decode(self, mixer, projected: torch.Tensor, group, slots) -> torch.Tensor | None:
        """``GatedDeltaNet`` from its projections to the input of ``out_proj`` [rows, value_dim]; None when its
        activations are not the ones written here (the mixer then runs its usual path)."""
        if mixer.config.conv_activation != "silu":
            return None
        out = projected.new_empty(projected.shape[0], mixer.value_dim)
        _gdn_decode(_np(projected), group.cache.arena.numpy_f32(), group.decode_blocks_host(),
                    slots.conv_offsets[0], _taps(mixer.convolution), mixer.key_heads, mixer.value_heads,
                    mixer.key_head_dim, mixer.value_head_dim, *_gates(mixer), np.float32(mixer.norm.eps),
                    np.float32(mixer.key_head_dim**-0.5), out.numpy())
        return out

    def kda_decode(self, mixer, projected, f, gate, group, slots) -> torch.Tensor | None:
        """``KimiDeltaAttention`` from its projections to the input of ``o_proj`` [rows, heads * head_dim]."""
        activation = mixer.config.norm_activation
        if activation not in ("silu", "sigmoid"):
            return None
        out = f.new_empty(f.shape[0], mixer.heads * mixer.head_dim)
        _kda_decode(_np(projected), _np(f), _np(gate), group.cache.arena.numpy_f32(),
                    group.decode_blocks_host(), np.asarray(slots.conv_offsets, dtype=np.int64),
                    _taps(mixer.q_conv), _taps(mixer.k_conv), _taps(mixer.v_conv), mixer.heads, mixer.head_dim,
                    *_gates(mixer), np.float32(mixer.norm.eps), activation == "sigmoid",
                    np.float32(mixer.head_dim**-0.5), out.numpy())
        return out

    def conv_decode(self, conv, x: torch.Tensor, group, slots, index: int) -> torch.Tensor:
        """The group's one-token rows through ``conv``, continuing from (and shifting) history ``index``."""
        out = torch.empty_like(x)
        _conv_decode(_np(x), group.cache.arena.numpy_f32(), slots.conv_offsets[index], conv.kernel,
                     group.decode_blocks_host(), _taps(conv), out.numpy())
        return out
