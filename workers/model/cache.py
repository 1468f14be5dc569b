"""The cache arena: one tensor of equal blocks, of which every mixer's cache is a view (``policies.memory``'s layout).

    arena.data  uint8 [num_blocks, block_bytes], allocated once

    attention page   K [kv_heads, page_tokens, head_size] | V [same]          (model dtype)
    recurrent slot   state [heads, key_dim, value_dim] (fp32) | conv history [kernel-1, channels] per conv

A sequence's attention layer owns a list of pages (its row of the pool's block
table); token at position p lives on page ``table[(p % ring) // page_tokens]`` at
offset ``p % page_tokens``, where ``ring`` is the pages' total tokens: full
attention never wraps (its pages hold the whole context), a sliding window's
ring holds its last ``ring >= window`` tokens. A recurrent layer owns one block.
Mixers read and write these views by index (``index_put_``, gathers, or the
GPU kernels' block tables and state indices); nothing here knows sequences.
Block 0 is the null block: padded rows point at it and write garbage there.
"""

from __future__ import annotations

import numpy as np
import torch

from policies.memory import AttentionShape, CacheMemoryModel, DeltaRuleShape

NULL_BLOCK = 0


class KVPages:
    """Keys and values of every block seen as a page, stored head-major: ``[num_blocks, kv_heads, page_tokens,
    head_size]`` (a head's page is one contiguous run, so gathering a row's pages per head copies whole runs
    into ``[tokens, head_size]`` order). ``by_token`` is the same memory as ``[num_blocks, page_tokens, kv_heads,
    head_size]``, for writing and reading single tokens."""

    __slots__ = ("keys", "values", "by_token", "value_offset")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, value_offset: int):
        self.keys = keys
        self.values = values
        self.by_token = (keys.transpose(1, 2), values.transpose(1, 2))
        self.value_offset = value_offset  # where V starts in a block, in elements (K starts at 0)


class StateSlots:
    """Every block seen as a recurrent slot: ``state`` [num_blocks, heads, key_dim, value_dim] fp32 and one
    ``[num_blocks, kernel - 1, channels]`` history per short convolution."""

    __slots__ = ("state", "conv", "conv_offsets")

    def __init__(self, state: torch.Tensor, conv: list[torch.Tensor], conv_offsets: list[int]):
        self.state = state
        self.conv = conv
        self.conv_offsets = conv_offsets  # where each history starts in a block, in 4-byte words


class CacheArena:
    __slots__ = ("memory", "data", "dtype", "_views", "_numpy")

    def __init__(self, memory: CacheMemoryModel, num_blocks: int, dtype: torch.dtype, device):
        if dtype.itemsize != memory.kv_bytes:
            raise ValueError(f"the memory model stores keys in {memory.kv_bytes}-byte elements, the model is {dtype}")
        self.memory = memory
        self.dtype = dtype
        # Zeros, not empty: masked-out key slots are still multiplied by zero weights, and 0 * NaN is NaN.
        self.data = torch.zeros(num_blocks, memory.block_bytes, dtype=torch.uint8, device=device)
        self._views: dict[tuple, KVPages | StateSlots] = {}
        self._numpy = None

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def page_tokens(self) -> int:
        return self.memory.page_tokens

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def _region(self, offset: int, nbytes: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return self.data[:, offset:offset + nbytes].view(dtype).view(self.num_blocks, *shape)

    def kv(self, shape: AttentionShape) -> KVPages:
        key = ("kv", shape.kv_heads, shape.head_size)
        view = self._views.get(key)
        if view is None:
            dims = (shape.kv_heads, self.page_tokens, shape.head_size)
            half = self.page_tokens * shape.kv_heads * shape.head_size * self.dtype.itemsize
            view = self._views[key] = KVPages(self._region(0, half, self.dtype, *dims),
                                              self._region(half, half, self.dtype, *dims), half // self.dtype.itemsize)
        return view

    def states(self, shape: DeltaRuleShape, conv_channels: tuple[int, ...]) -> StateSlots:
        """The slots of a mixer whose convolutions have ``conv_channels`` channels each (GDN one, KDA three)."""
        if sum(conv_channels) != shape.conv_channels:
            raise ValueError(f"conv channels {conv_channels} do not add up to the shape's {shape.conv_channels}")
        key = ("state", shape, conv_channels)
        view = self._views.get(key)
        if view is None:
            assert self.memory.state_bytes == 4, "recurrent states are kept in fp32"
            state_bytes = shape.state_elements() * 4
            state = self._region(0, state_bytes, torch.float32, shape.heads, shape.key_dim, shape.value_dim)
            conv, offsets, offset, history = [], [], state_bytes, shape.conv_kernel - 1
            for channels in conv_channels:
                nbytes = history * channels * self.dtype.itemsize
                conv.append(self._region(offset, nbytes, self.dtype, history, channels))
                offsets.append(offset // 4)
                offset += nbytes
            view = self._views[key] = StateSlots(state, conv, offsets)
        return view

    def elements(self, dtype: torch.dtype) -> torch.Tensor:
        """The arena as ``[num_blocks, block_bytes / itemsize]`` elements of ``dtype`` (the kernels' flat view)."""
        view = self._views.get(("flat", dtype))
        if view is None:
            view = self._views[("flat", dtype)] = self.data.view(dtype)
        return view

    def numpy_f32(self) -> np.ndarray:
        """The arena's memory as fp32 words [num_blocks, block_bytes / 4] (CPU only; the same memory)."""
        if self._numpy is None:
            self._numpy = self.data.numpy().view(np.float32)
        return self._numpy

    def zero(self, block_ids: torch.Tensor) -> None:
        """Clear blocks handed to a new sequence: recurrent states and conv histories start at zero."""
        self.data.index_fill_(0, block_ids, 0)


class BlockTables:
    """Which blocks each table row's layers use: ``pages`` [rows, layers, max_pages] (null-padded) and ``rings``
    [rows, layers], the tokens a layer's pages hold (1 for a recurrent layer), on the host and on the device.

    On a CPU the device tensors share the host arrays' memory; elsewhere a row is copied once when set.
    """

    __slots__ = ("pages_host", "rings_host", "pages", "rings")

    def __init__(self, max_rows: int, num_layers: int, max_pages: int, device):
        self.pages_host = np.full((max_rows, num_layers, max_pages), NULL_BLOCK, dtype=np.int64)
        self.rings_host = np.ones((max_rows, num_layers), dtype=np.int64)
        if torch.device(device).type == "cpu":
            self.pages, self.rings = torch.from_numpy(self.pages_host), torch.from_numpy(self.rings_host)
        else:
            self.pages = torch.from_numpy(self.pages_host).to(device)
            self.rings = torch.from_numpy(self.rings_host).to(device)

    @property
    def max_rows(self) -> int:
        return self.pages_host.shape[0]

    @property
    def max_pages(self) -> int:
        return self.pages_host.shape[2]

    def set_row(self, row: int, pages: np.ndarray, rings: np.ndarray) -> None:
        self.pages_host[row] = pages
        self.rings_host[row] = rings
        if self.pages.data_ptr() != self.pages_host.ctypes.data:
            self.pages[row].copy_(torch.from_numpy(pages))
            self.rings[row].copy_(torch.from_numpy(rings))
