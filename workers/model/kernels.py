"""Which kernels a model's mixers use, and the Triton/fla set for CUDA.

``SupernetLM.use_kernels`` hands one object to every mixer; with None they run
plain torch. Two sets:

- ``CpuKernels`` (``cpu_kernels.py``, numba): fp32 decode rows on a CPU;
- ``TritonKernels`` (here): decode rows through ``triton_kernels.py`` (paged
  attention, the delta rule and the short convolution, in place in the arena),
  and rows of several tokens through fla's chunked GDN/KDA kernels, one
  variable-length call per group (``cu_seqlens``) starting from the rows'
  states gathered from the pool, their final states written back.

Both take the same calls (``supports``, ``paged_decode``, ``delta_rule_decode``,
``conv_decode``); ``delta_rule_chunk`` is the CUDA set's alone.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from workers.model.batch import RowGroup

log = logging.getLogger(__name__)

NO_WINDOW = 1 << 62
SPLIT_MIN_SLOTS = 512  # split a row's slots into runs of at least this many (split-K) ...
MAX_SPLITS = 16  # ... and at most this many runs


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonKernels:
    """The CUDA kernel set (and, under ``TRITON_INTERPRET=1``, the same kernels on CPU tensors, for tests)."""


    def __init__(self, chunk: bool = True, block_n: int = 32):
        from workers.model import triton_kernels

        self._k = triton_kernels
        self.block_n = block_n
        self._chunk = None
        if chunk:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            from fla.ops.kda import chunk_kda

            self._chunk = {False: chunk_gated_delta_rule, True: chunk_kda}
        self.name = "triton+fla" if chunk else "triton"

    def supports(self, group: RowGroup) -> bool:
        return group.cache is not None and (group.cache.arena.data.is_cuda or triton_interpreted())

    # ---- decode rows: in place in the arena ----

    def paged_decode(self, q: torch.Tensor, group: RowGroup, shape, pages, window: int | None,
                     scale: float) -> torch.Tensor:
        """The group's one-token rows (already written) over their pages; q [rows, heads, D] -> same."""
        arena, tables = group.cache.arena, group.cache.tables
        table_rows, positions, rings, num_pages = group.decode_layout(shape)
        rows, heads, head = q.shape
        kv_heads = pages.keys.shape[1]
        most = num_pages * arena.page_tokens  # the most slots a row reads: the split sizes follow it
        splits = min(MAX_SPLITS, max(1, most // SPLIT_MIN_SLOTS))
        split_slots = -(-most // splits)
        split_slots = -(-split_slots // self.block_n) * self.block_n
        splits = -(-most // split_slots)
        partial = q.new_empty(rows, heads, splits, head, dtype=torch.float32)
        lse = q.new_empty(rows, heads, splits, dtype=torch.float32)
        kv = arena.elements(arena.dtype)
        group_size = heads // kv_heads
        self._k.paged_decode_split[(rows, kv_heads, splits)](
            q.contiguous(), kv, tables.pages, table_rows, positions, rings, partial, lse,
            group.layer, NO_WINDOW if window is None else window, scale, pages.value_offset, kv.stride(0),
            tables.pages.stride(0), tables.pages.stride(1), split_slots, splits,
            HEADS=heads, KV_HEADS=kv_heads, GROUP=group_size, HEAD=head, PAGE=arena.page_tokens,
            BLOCK_G=_pow2(group_size, 16), BLOCK_N=self.block_n, BLOCK_D=_pow2(head, 16),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        out = torch.empty_like(q)
        self._k.paged_decode_combine[(rows * heads,)](partial, lse, out, splits, HEAD=head,
                                                      BLOCK_S=_pow2(splits), BLOCK_D=_pow2(head))
        return out

    def delta_rule_decode(self, q, k, v, g, beta, group: RowGroup, slots, scale: float) -> torch.Tensor:
        """The group's one-token rows, each state updated in place in its block; o [rows, H, dv] fp32."""
        rows, heads, dk = q.shape
        dv = v.shape[2]
        out = q.new_empty(rows, heads, dv, dtype=torch.float32)
        state = group.cache.arena.elements(torch.float32)
        block_v = min(64, _pow2(dv))
        self._k.delta_rule_decode[(rows, heads, -(-dv // block_v))](
            q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), state,
            group.decode_blocks(), out, scale, state.stride(0),
            HEADS=heads, DK=dk, DV=dv, BLOCK_K=_pow2(dk), BLOCK_V=block_v, PER_CHANNEL=g.dim() == 3)
        return out

    def conv_decode(self, conv, x: torch.Tensor, group: RowGroup, slots, index: int) -> torch.Tensor:
        """The group's one-token rows through ``conv``, continuing from (and shifting) history ``index``."""
        rows, channels = x.shape
        arena = group.cache.arena
        history = arena.elements(arena.dtype)
        out = torch.empty_like(x)
        block_c = min(256, _pow2(channels))
        self._k.conv_decode[(rows, -(-channels // block_c))](
            x.contiguous(), history, _taps(conv), out, group.decode_blocks(),
            slots.conv_offsets[index] * 4 // arena.dtype.itemsize, history.stride(0), channels,
            KERNEL=conv.kernel, BLOCK_C=block_c)
        return out

    # ---- rows of several tokens: fla's chunked kernels ----

    def delta_rule_chunk(self, q, k, v, g, beta, group: RowGroup, slots, scale: float,
                         out: torch.Tensor) -> torch.Tensor | None:
        """The group's rows of several tokens (every row without a cache) in one variable-length call, into
        ``out`` [T, H, dv] fp32; None when fla is not loaded (the caller runs its torch path)."""
        if self._chunk is None or not q.is_cuda:
            return None
        rows = group.set
        picked = rows.prefill if slots is not None else range(len(rows.rows))
        spans = [(rows.rows[r].offset, rows.rows[r].length) for r in picked]
        lengths = np.array([0] + [n for _, n in spans])
        index = torch.from_numpy(np.concatenate([np.arange(o, o + n) for o, n in spans])).to(q.device)
        cu_seqlens = torch.from_numpy(np.cumsum(lengths)).to(q.device)
        blocks = None
        if slots is not None:
            blocks = group.blocks(torch.tensor(list(picked), device=q.device))
            initial = slots.state[blocks]
        else:
            initial = q.new_zeros(len(spans), q.shape[1], q.shape[2], v.shape[2], dtype=torch.float32)
        o, final = self._chunk[g.dim() == 3](
            q[index][None], k[index][None], v[index][None], g=g[index][None], beta=beta[index][None], scale=scale,
            initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        out[index] = o[0].float()
        if blocks is not None:
            slots.state.index_put_((blocks,), final.float())
        return out


def _taps(conv) -> torch.Tensor:
    """A conv's weight as [kernel, channels] (contiguous), made once per weight version."""
    weight = conv.weight
    key = (weight.data_ptr(), weight._version)
    cached = getattr(conv, "_taps", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach()[:, 0, :].t().contiguous())
        conv._taps = cached
    return cached[1]


def select_kernels(device: torch.device, required: bool = False):
    """Triton + fla on a CUDA device, the numba decode kernels on a CPU (``required``: the CUDA set or fail)."""
    if device.type != "cuda":
        if required:
            raise RuntimeError("the Triton/fla kernels need a CUDA device")
        from workers.model.cpu_kernels import CpuKernels

        return CpuKernels()
    try:
        return TritonKernels()
    except ImportError as exc:
        if required:
            raise
        log.warning("flash-linear-attention is not importable (%s): GDN/KDA prefill runs the plain-torch path", exc)
        try:
            return TritonKernels(chunk=False)
        except ImportError as inner:
            log.warning("triton is not importable (%s): decode runs the plain-torch path", inner)
            return None
