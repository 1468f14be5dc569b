"""Per-sequence caches, one object per (sequence, layer) for the mixer that layer runs.

Sizes match ``policies.memory`` exactly: full attention keeps every token,
sliding window a ring of ``window`` tokens, GDN/KDA an fp32 state per head plus
the short convolutions' last ``kernel - 1`` inputs. Buffers are allocated once
at the sequence's capacity and written by index (gpt-fast style).
"""

from __future__ import annotations

import torch

from policies.placement import Placement


class KVCache:
    """Keys and values of every token so far (full attention)."""

    __slots__ = ("keys", "values", "length")

    def __init__(self, capacity: int, kv_heads: int, head_size: int, dtype: torch.dtype, device):
        self.keys = torch.zeros(capacity, kv_heads, head_size, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def extend(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        """Append new tokens at ``start``; return all keys, values and their positions."""
        end = start + keys.shape[0]
        if start != self.length:
            raise RuntimeError(f"attention cache holds {self.length} tokens, got new tokens at {start}")
        if end > self.keys.shape[0]:
            self._grow(end)
        self.keys[start:end] = keys
        self.values[start:end] = values
        self.length = end
        positions = torch.arange(end, device=keys.device)
        return self.keys[:end], self.values[:end], positions

    def append(self, key: torch.Tensor, value: torch.Tensor, position: int):
        """Decode: store one token's key and value [kv_heads, head_size]; return every key and value so far
        (views, nothing copied), all of which the new token sees."""
        if position != self.length:
            raise RuntimeError(f"attention cache holds {self.length} tokens, got new tokens at {position}")
        if position >= self.keys.shape[0]:
            self._grow(position + 1)
        self.keys[position] = key
        self.values[position] = value
        self.length = position + 1
        return self.keys[:self.length], self.values[:self.length]

    def _grow(self, needed: int) -> None:
        # Only when a caller under-reserved; the engine reserves prompt + max_tokens up front.
        capacity = max(needed, 2 * self.keys.shape[0])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(capacity, *old.shape[1:])
            new[: self.length] = old[: self.length]
            setattr(self, name, new)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class RingKVCache:
    """The last ``window`` keys and values (sliding window); token at position p lives in slot p % window.

    A sequence shorter than the window gets only ``capacity`` slots (positions below it map to themselves).
    """

    __slots__ = ("keys", "values", "length", "window")

    def __init__(self, window: int, capacity: int, kv_heads: int, head_size: int, dtype: torch.dtype, device):
        self.keys = torch.zeros(min(window, capacity), kv_heads, head_size, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0
        self.window = window

    def extend(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        """Return the keys new queries at ``start..`` can see (``window - 1`` earlier ones plus the new), then store."""
        if start != self.length:
            raise RuntimeError(f"sliding-window cache holds {self.length} tokens, got new tokens at {start}")
        device = keys.device
        size = self.keys.shape[0]
        if size < self.window and start + keys.shape[0] > size:
            self._grow(min(self.window, max(start + keys.shape[0], 2 * size)))
        # Read the history before writing: with several new tokens the ring may overwrite slots they still need.
        first = max(0, start - (self.window - 1))
        past = torch.arange(first, start, device=device)
        slots = past % self.window
        all_keys = torch.cat([self.keys[slots], keys])
        all_values = torch.cat([self.values[slots], values])
        positions = torch.cat([past, torch.arange(start, start + keys.shape[0], device=device)])
        kept = min(keys.shape[0], self.window)
        write = positions[-kept:] % self.window
        self.keys[write] = keys[-kept:]
        self.values[write] = values[-kept:]
        self.length = start + keys.shape[0]
        return all_keys, all_values, positions

    def append(self, key: torch.Tensor, value: torch.Tensor, position: int):
        """Decode: store one token's key and value in slot ``position % window``; return the ring's filled
        slots (views, nothing copied). They hold exactly the window the new token sees, in ring order, which
        attention does not mind: softmax and the weighted sum do not depend on the order of the keys."""
        if position != self.length:
            raise RuntimeError(f"sliding-window cache holds {self.length} tokens, got new tokens at {position}")
        size = self.keys.shape[0]
        if size < self.window and position >= size:
            self._grow(min(self.window, max(position + 1, 2 * size)))
        slot = position % self.window
        self.keys[slot] = key
        self.values[slot] = value
        self.length = position + 1
        filled = min(self.length, self.window)
        return self.keys[:filled], self.values[:filled]

    def _grow(self, slots: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(slots, *old.shape[1:])
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class DeltaRuleCache:
    """GDN/KDA: the fp32 recurrent state per head and the history of each short convolution."""

    __slots__ = ("state", "conv")

    def __init__(self, heads: int, key_dim: int, value_dim: int, conv_channels: list[int], kernel: int,
                 dtype: torch.dtype, device):
        self.state = torch.zeros(heads, key_dim, value_dim, dtype=torch.float32, device=device)
        self.conv = [torch.zeros(kernel - 1, channels, dtype=dtype, device=device) for channels in conv_channels]

    def nbytes(self) -> int:
        return self.state.nbytes + sum(c.nbytes for c in self.conv)


LayerCache = KVCache | RingKVCache | DeltaRuleCache


class SequenceCache:
    """Everything one sequence keeps between steps under its placement: one layer cache per layer."""

    __slots__ = ("placement", "layers", "length")

    def __init__(self, placement: Placement, layers: list[LayerCache]):
        self.placement = placement
        self.layers = layers
        self.length = 0  # tokens already run through the model; owned by SupernetLM.forward

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
