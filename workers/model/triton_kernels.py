"""Triton decode kernels over the cache arena: paged attention, the gated delta rule, the short convolution.

Each reads its rows' blocks straight from the arena by block table or block id
and (for the recurrent ones) writes them back in place, so a decode step copies
no cache and its launches do not depend on the batch's rows: the shape of step
CUDA graphs capture. The arena's addressing is ``workers/model/cache.py``'s,
seen as one flat run of elements per block:

    attention page   K of kv head h, slot t, dim d at  (h * page + t) * D + d;  V ``value_offset`` further
    recurrent slot   state [heads, dk, dv] fp32 from 0;  a conv history [kernel - 1, channels] at its offset

Rows whose block is the null block (padding of a captured batch) are skipped:
they read nothing and write nothing.

Paged decode attention splits each row's slots into ``splits`` runs (split-K,
as SGLang's ``decode_attention_fwd`` and vLLM's ``unified_attention`` do, so a
small batch at long context still fills the GPU): each run keeps its own online
softmax (max, sum, weighted values), and a second kernel combines the runs by
their log-sum-exp. A GQA group's query heads share one program, so each key is
read once per kv head, not once per query head. The dot products take fp32
operands: with a bf16 cache, "tf32" precision multiplies the bf16 values exactly
(bf16 fits in tf32) at the tensor cores' tf32 rate, ample for a step that is
bound by reading the cache (and Triton's interpreter mis-multiplies bf16 dots).

Under ``TRITON_INTERPRET=1`` these run on CPU tensors (slowly), which is how CI
checks them against the plain-torch path (``tests/unit/model/test_triton_kernels.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

NULL_BLOCK = 0  # workers.model.cache.NULL_BLOCK (not imported: this module holds only kernels)


@triton.jit
def paged_decode_split(Q, KV, Pages, TableRows, Positions, Rings, Partial, Lse,
                       layer, window, scale, value_offset, block_stride, pages_row_stride, pages_layer_stride,
                       split_slots, splits,
                       HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """One (row, kv head, split): the split's slots of the row's ring, for the kv head's GROUP query heads."""
    row, kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    table = tl.load(TableRows + row)
    position = tl.load(Positions + row)
    ring = tl.load(Rings + row)
    pages = Pages + table * pages_row_stride + layer * pages_layer_stride
    live = tl.load(pages) != NULL_BLOCK  # a padded row owns no pages
    slots = tl.minimum(position + 1, ring)  # slots holding a token (every slot once a ring has wrapped)
    slots = tl.where(live, slots, 0)

    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    head_ok, dim_ok = heads < GROUP, dims < HEAD
    q = tl.load(Q + (row * HEADS + kv * GROUP + heads[:, None]) * HEAD + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)

    best = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = split * split_slots
    last = tl.minimum(first + split_slots, slots)
    for start in range(first, last, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        held = j < last
        # A ring slot j holds position p - ((p - j) mod ring); j <= p here, so p - j >= 0.
        visible = held & ((position - j) % ring < window)
        page = tl.load(pages + j // PAGE, mask=held, other=NULL_BLOCK)
        at = page.to(tl.int64) * block_stride + (kv * PAGE + j % PAGE) * HEAD
        mask = held[:, None] & dim_ok[None, :]
        k = tl.load(KV + at[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        # Nothing visible yet: keep the weights at 0 rather than exp(-inf - -inf) = NaN.
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - safe[:, None])
        rescale = tl.exp(best - safe)
        v = tl.load(KV + value_offset + at[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision=PRECISION)
        total = total * rescale + tl.sum(weights, 1)
        best = new_best

    out = (row * HEADS + kv * GROUP + heads) * splits + split
    seen = total > 0  # a run past the row's last slot (or a padded row's) saw nothing: its weight is 0
    divisor = tl.where(seen, total, 1.0)
    tl.store(Partial + out[:, None] * HEAD + dims[None, :], acc / divisor[:, None],
             mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + out, tl.where(seen, best + tl.log(divisor), float("-inf")), mask=head_ok)


@triton.jit
def paged_decode_combine(Partial, Lse, Out, splits, HEAD: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One (row, head): the splits' partial outputs weighted by their share of the softmax."""
    index = tl.program_id(0)  # row * heads + head
    runs, dims = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    run_ok, dim_ok = runs < splits, dims < HEAD
    lse = tl.load(Lse + index * splits + runs, mask=run_ok, other=float("-inf"))
    best = tl.max(lse, 0)
    weights = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(best == float("-inf"), 0.0, best)))
    parts = tl.load(Partial + (index * splits + runs[:, None]) * HEAD + dims[None, :],
                    mask=run_ok[:, None] & dim_ok[None, :], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + index * HEAD + dims, out.to(Out.dtype.element_ty), mask=dim_ok)


@triton.jit
def delta_rule_decode(Q, K, V, G, Beta, State, Blocks, Out, scale, block_stride,
                      HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_V: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """One (row, head, value block): S = exp(g) S; u = beta (v - S^T k); S += k u^T; o = S^T (q * scale),
    with q and k L2-normalised in fp32 (fla's in-kernel norm), the state read and written in its block."""
    row, head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    block = tl.load(Blocks + row)
    live = block != NULL_BLOCK
    keys = tl.arange(0, BLOCK_K)
    values = part * BLOCK_V + tl.arange(0, BLOCK_V)
    # (A scalar condition broadcast before the "&": Triton's interpreter rejects scalar & tensor masks.)
    key_ok = (keys < DK) & ((keys * 0 + block) != NULL_BLOCK)
    value_ok = (values < DV) & ((values * 0 + block) != NULL_BLOCK)
    at = row * HEADS + head
    q = tl.load(Q + at * DK + keys, mask=key_ok, other=0.0).to(tl.float32)
    k = tl.load(K + at * DK + keys, mask=key_ok, other=0.0).to(tl.float32)
    q = q / tl.sqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = k / tl.sqrt(tl.sum(k * k, 0) + 1e-6)
    v = tl.load(V + at * DV + values, mask=value_ok, other=0.0).to(tl.float32)
    beta = tl.load(Beta + at, mask=live, other=0.0).to(tl.float32)
    if PER_CHANNEL:  # KDA: one decay per key channel
        decay = tl.exp(tl.load(G + at * DK + keys, mask=key_ok, other=0.0).to(tl.float32))[:, None]
    else:
        decay = tl.exp(tl.load(G + at, mask=live, other=0.0).to(tl.float32))
    pointers = State + block.to(tl.int64) * block_stride + head * DK * DV + keys[:, None] * DV + values[None, :]
    mask = key_ok[:, None] & value_ok[None, :]
    state = tl.load(pointers, mask=mask, other=0.0) * decay
    update = beta * (v - tl.sum(k[:, None] * state, 0))
    state = state + k[:, None] * update[None, :]
    tl.store(pointers, state, mask=mask)
    tl.store(Out + at * DV + values, tl.sum(q[:, None] * state, 0), mask=value_ok)


@triton.jit
def conv_decode(X, History, Taps, Out, Blocks, offset, block_stride, channels,
                KERNEL: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (row, channel block) of a causal depthwise conv's step: out = sum_j window[j] * taps[j] over the
    history and the new token (fp32 sums), then the history shifts by one token, in its block."""
    row, part = tl.program_id(0), tl.program_id(1)
    block = tl.load(Blocks + row)
    c = part * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < channels
    live = ok & ((c * 0 + block) != NULL_BLOCK)  # (broadcast first: see delta_rule_decode)
    x = tl.load(X + row * channels + c, mask=ok, other=0.0)
    acc = x.to(tl.float32) * tl.load(Taps + (KERNEL - 1) * channels + c, mask=ok, other=0.0).to(tl.float32)
    base = History + block.to(tl.int64) * block_stride + offset
    for j in tl.static_range(KERNEL - 1):  # oldest first; each read before its slot is overwritten
        past = tl.load(base + j * channels + c, mask=live, other=0.0)
        acc += past.to(tl.float32) * tl.load(Taps + j * channels + c, mask=ok, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(base + (j - 1) * channels + c, past, mask=live)
    tl.store(base + (KERNEL - 2) * channels + c, x.to(History.dtype.element_ty), mask=live)
    tl.store(Out + row * channels + c, acc.to(Out.dtype.element_ty), mask=ok)
