"""Full and sliding-window attention: GQA with rotary embeddings, causal.

A sliding-window query at position p sees keys p-W+1 .. p (W keys including
itself). Each row attends over its own cache; the mask is built from absolute
key positions, so chunked prefill and multi-token steps past the window are
exact (the reference's cached path is not in those cases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.batch import RowGroup
from workers.model.cache import KVCache, RingKVCache
from workers.model.config import AttentionConfig
from workers.model.layers import Rotary


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

    def new_cache(self, capacity: int, dtype: torch.dtype, device) -> KVCache | RingKVCache:
        if self.window is None:
            return KVCache(capacity, self.kv_heads, self.head_size, dtype, device)
        return RingKVCache(self.window, capacity, self.kv_heads, self.head_size, dtype, device)

    def forward(self, x: torch.Tensor, group: RowGroup) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.heads, self.head_size)
        k = self.k_proj(x).view(tokens, self.kv_heads, self.head_size)
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_size)
        cos, sin = self.rotary.cos_sin(group.positions, x.dtype)
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)

        length = group.dense_length
        if length is not None:
            out = self._attend_block(q, k, v, len(group.rows), length)
            return self.o_proj(out.reshape(tokens, self.heads * self.head_size))
        out = torch.empty_like(q)
        if group.is_decode and group.caches is not None:
            # One new token per row: every key its cache returns is visible to it, so no mask, no positions
            # and no copy of the cache (the ring's slots come back in ring order: attention does not mind).
            for r, (row, cache) in enumerate(zip(group.rows, group.caches)):
                keys, values = cache.append(k[r], v[r], row.start)
                out[r] = self._sdpa(q[r:r + 1], keys, values, None)[0]
            return self.o_proj(out.reshape(tokens, self.heads * self.head_size))
        for r, row in enumerate(group.rows):
            span = slice(row.offset, row.offset + row.length)
            query_positions = group.positions[span]
            if group.caches is None:
                keys, values, key_positions = k[span], v[span], query_positions
            else:
                keys, values, key_positions = group.caches[r].extend(k[span], v[span], row.start)
            out[span] = self._attend(q[span], keys, values, query_positions, key_positions)
        return self.o_proj(out.reshape(tokens, self.heads * self.head_size))

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
