"""Full and sliding-window attention: GQA with rotary embeddings, causal, over the engine's paged KV pool.

A sliding-window query at position p sees keys p-W+1 .. p (W keys including
itself). With a cache, a step writes every new key and value into its page slot
(``RowGroup.write_slots``) and then:

- one-token rows (decode) attend over their pages in one batched call: on a
  CPU, the pages are gathered into [rows, pages * page_tokens] and masked by
  each slot's position (a ring slot j holds position p - ((p - j) mod ring)), with
  a GQA group's query heads as one kv head's queries; on
  CUDA, a paged decode kernel reads them in place (``workers/model/paged_attention.py``);
- rows of several tokens (prefill chunks) read their history *before* the
  writes (a sliding window's ring may overwrite it) and attend with a mask
  built from absolute positions, so chunked prefill past the window is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.batch import RowGroup
from workers.model.config import AttentionConfig, cache_shape
from workers.model.layers import Rotary, project


class Attention(nn.Module):
    def __init__(self, hidden_size: int, config: AttentionConfig):
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.head_size = config.heads, config.head_groups, config.head_size
        self.window = config.window_size
        self.scale = self.head_size**-0.5
        self.q_proj = nn.Linear(hidden_size, self.heads * self.head_size, bias=config.q_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_heads * self.head_size, bias=config.k_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_heads * self.head_size, bias=config.v_bias)
        self.o_proj = nn.Linear(self.heads * self.head_size, hidden_size, bias=config.o_bias)
        self.rotary = Rotary(self.head_size, config.rotary_theta)
        self.cache_shape = cache_shape(config)
        self.kernels = None  # decode kernels (SupernetLM.use_kernels: numba on a CPU, Triton on CUDA); None: torch

    def forward(self, x: torch.Tensor, group: RowGroup) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = project(x, self.q_proj, self.k_proj, self.v_proj)
        cos, sin = group.cos_sin(self.rotary, x.dtype)
        fused = getattr(self.kernels, "attention_decode", None)  # the CPU kernels: rotary, write, decode in one
        if fused is not None and group.cache is not None and group.is_decode and self.kernels.supports(group):
            pages = group.cache.arena.kv(self.cache_shape)
            out = fused(qkv, self.heads, cos, sin, group, pages, self.window, self.scale)
            return self.o_proj(out.reshape(tokens, self.heads * self.head_size))
        size, kv_size = self.heads * self.head_size, self.kv_heads * self.head_size
        q, k, v = qkv.split([size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, self.heads, self.head_size)
        k = k.view(tokens, self.kv_heads, self.head_size)
        v = v.view(tokens, self.kv_heads, self.head_size)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        out = self._no_cache(q, k, v, group) if group.cache is None else self._cached(q, k, v, group)
        return self.o_proj(out.reshape(tokens, self.heads * self.head_size))

    def _no_cache(self, q, k, v, group: RowGroup) -> torch.Tensor:
        length = group.dense_length
        if length is not None:
            return self._attend_block(q, k, v, len(group.rows), length)
        out = torch.empty_like(q)
        for row in group.rows:
            span = slice(row.offset, row.offset + row.length)
            positions = group.positions[span]
            out[span] = self._attend(q[span], k[span], v[span], positions, positions)
        return out

    def _cached(self, q, k, v, group: RowGroup) -> torch.Tensor:
        rows = group.set
        pages = group.cache.arena.kv(self.cache_shape)
        keys_by_token, values_by_token = pages.by_token
        out = None if rows.is_decode else torch.empty_like(q)
        for r in rows.prefill:  # before the writes below: a ring may overwrite what these rows still see
            row = rows.rows[r]
            span = slice(row.offset, row.offset + row.length)
            page, offset, past = group.history(r, self.window)
            keys = torch.cat([keys_by_token[page, offset], k[span]])
            values = torch.cat([values_by_token[page, offset], v[span]])
            positions = group.positions[span]
            out[span] = self._attend(q[span], keys, values, positions, torch.cat([past, positions]))
        page, offset = group.write_slots()
        keys_by_token.index_put_((page, offset), k)
        values_by_token.index_put_((page, offset), v)
        if not rows.num_decode:
            return out
        decode_q = q if rows.decode_tokens is None else q[rows.decode_tokens]
        decoded = self._decode(decode_q, pages, group)
        if out is None:
            return decoded
        out[rows.decode_tokens] = decoded
        return out

    def _decode(self, q: torch.Tensor, pages, group: RowGroup) -> torch.Tensor:
        """One new token per row, already written: attend over each row's pages in one batched call."""
        if self.kernels is not None and self.kernels.supports(group):
            return self.kernels.paged_decode(q, group, self.cache_shape, pages, self.window, self.scale)
        tables, positions, rings, num_pages = group.decode_pages(self.cache_shape)
        rows, span = q.shape[0], num_pages * pages.keys.shape[2]
        keys, values = (_gather_pages(x, tables, rows, span) for x in (pages.keys, pages.values))
        visible = group.decode_mask(self.cache_shape, span)
        # A kv head's G query heads as G queries of that head (heads j*G .. j*G+G-1 share kv head j).
        grouped = q.view(rows, self.kv_heads, self.heads // self.kv_heads, self.head_size)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible, scale=self.scale)
        return out.reshape(rows, self.heads, self.head_size)

    def _attend_block(self, q, k, v, rows: int, length: int) -> torch.Tensor:
        """Rows of equal length from position 0, no cache: one batched causal (or banded) SDPA call."""
        q, k, v = (x.view(rows, length, -1, self.head_size).transpose(1, 2) for x in (q, k, v))
        mask = None
        if self.window is not None and length > self.window:
            position = torch.arange(length, device=q.device)
            offset = position[:, None] - position[None, :]
            mask = (offset >= 0) & (offset < self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=self.heads != self.kv_heads)
        return out.transpose(1, 2).reshape(rows * length, self.heads, self.head_size)

    def _attend(self, q, keys, values, query_positions, key_positions) -> torch.Tensor:
        """One row: q [n, H, d] over keys/values [m, KVH, d] -> [n, H, d]."""
        visible = key_positions[None, :] <= query_positions[:, None]
        if self.window is not None:
            visible &= key_positions[None, :] > query_positions[:, None] - self.window
        return self._sdpa(q, keys, values, None if bool(visible.all()) else visible)

    def _sdpa(self, q, keys, values, mask) -> torch.Tensor:
        """One row: q [n, H, d] over keys/values [m, KVH, d] -> [n, H, d]."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, scale=self.scale, enable_gqa=self.heads != self.kv_heads,
        )
        return out[0].transpose(0, 1)


def _gather_pages(pages: torch.Tensor, tables: torch.Tensor, rows: int, span: int) -> torch.Tensor:
    """Each row's pages ``tables`` [rows, P] of ``pages`` [blocks, kv_heads, page, d] as [rows, kv_heads, span, d]:
    one copy of whole page runs per kv head (no transpose of the gathered data)."""
    heads, head_size = pages.shape[1], pages.shape[3]
    index = tables.reshape(-1)
    out = pages.new_empty(heads, index.shape[0], pages.shape[2], head_size)
    for head in range(heads):  # a fixed, small count (the model's kv heads), not rows
        torch.index_select(pages[:, head], 0, index, out=out[head])
    return out.view(heads, rows, span, head_size).transpose(0, 1)
