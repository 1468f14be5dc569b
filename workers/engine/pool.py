"""The engine's cache memory: one arena of blocks carved from the byte budget, a free list, and a block table.

Allocated once, at engine start: ``budget // block_bytes`` blocks (block 0 is
the null block that padded rows use, so one fewer is lent out). A sequence takes
all its blocks at admission, for prompt + max_tokens (the whole-life reservation
the scheduler accounts in bytes and the router predicts with
``policies.memory``), and gives them back when it finishes: no growth, no
preemption. Any block serves any mixer of any layer, so one budget covers every
mix of placements.

The block table is ``[2 * max_rows + 1, num_layers, max_pages]``: a running sequence owns
one row (its ``SequenceBlocks.row``), and a second for its draft's caches when it
speculates; layer l's pages are ``table[row, l, :n]`` (a recurrent layer's block at
``[row, l, 0]``, and when speculating the snapshot it is restored from at
``[row, l, 1]``), ``rings[row, l]`` the tokens those pages hold; the last row is the
padding row, all null, that padded rows of a captured decode batch use (``graphs.py``). The table lives on the model's device
(on a CPU it shares the host array's memory), written once per admission; a step
only sends row numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from policies.errors import ConfigError
from policies.memory import AttentionShape, CacheMemoryModel
from policies.placement import Placement
from policies.speculation import MAX_DRAFT_TOKENS
from workers.model.cache import NULL_BLOCK, BlockTables, CacheArena


class SequenceBlocks:
    """What one sequence (or its draft) holds: its row of the block table, every block id it took, for which
    placement, and with speculation the (live, snapshot) block pairs of its recurrent layers."""

    __slots__ = ("row", "block_ids", "placement", "live", "snapshots")

    def __init__(self, row: int, block_ids: list[int], placement: Placement, live: list[int],
                 snapshots: list[int]):
        self.row = row
        self.block_ids = block_ids
        self.placement = placement
        self.live, self.snapshots = live, snapshots  # empty unless speculating with recurrent layers

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class CachePool:
    def __init__(self, memory: CacheMemoryModel, budget_bytes: int, max_rows: int, max_context: int,
                 dtype: torch.dtype, device):
        num_blocks = budget_bytes // memory.block_bytes
        if num_blocks < 2:
            raise ConfigError(f"a cache budget of {budget_bytes:,} bytes holds {num_blocks} block(s) of "
                              f"{memory.block_bytes:,} bytes; the pool needs at least 2 (one is the null block)")
        self.memory = memory
        self.arena = CacheArena(memory, num_blocks, dtype, device)
        usable = num_blocks - 1
        # No sequence can own more pages than the pool lends, whatever its context and speculation.
        max_pages = min(usable, max(shape.num_blocks(max_context, memory.page_tokens, MAX_DRAFT_TOKENS)
                                    for layer in memory.layers for shape in layer.values()))
        # Two rows per running sequence (its own and its draft's), and the padding row (all null blocks,
        # never lent) of captured decode batches.
        self.max_rows = max_rows  # the most rows one step runs
        self.tables = BlockTables(2 * max_rows + 1, memory.num_layers, max_pages, device)
        self.padding_row = 2 * max_rows
        self._free_blocks = list(range(num_blocks - 1, NULL_BLOCK, -1))  # popped from the end: low ids first
        self._free_rows = list(range(2 * max_rows - 1, -1, -1))
        self._held: dict[int, SequenceBlocks] = {}  # row -> its blocks

    @property
    def block_bytes(self) -> int:
        return self.memory.block_bytes

    @property
    def usable_blocks(self) -> int:
        return self.arena.num_blocks - 1

    @property
    def usable_bytes(self) -> int:
        """What the pool lends out: the scheduler's budget."""
        return self.usable_blocks * self.block_bytes

    @property
    def held_bytes(self) -> int:
        return (self.usable_blocks - len(self._free_blocks)) * self.block_bytes

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def allocate(self, placement: Placement, capacity: int, speculative_tokens: int = 0) -> SequenceBlocks:
        """Every block a sequence of up to ``capacity`` tokens needs under ``placement``, zeroed, and a table row
        (with ``speculative_tokens``, the ring slack and state snapshots speculation needs)."""
        need = self.memory.sequence_blocks(placement, capacity, speculative_tokens)
        if need > len(self._free_blocks) or not self._free_rows:
            raise RuntimeError(f"the cache pool has {len(self._free_blocks)} free blocks and {len(self._free_rows)} "
                               f"free rows; placement {placement.code} at {capacity} tokens needs {need} blocks")
        row = self._free_rows.pop()
        ids = [self._free_blocks.pop() for _ in range(need)]
        pages = np.full((self.memory.num_layers, self.tables.max_pages), NULL_BLOCK, dtype=np.int64)
        rings = np.ones(self.memory.num_layers, dtype=np.int64)
        taken, live, snapshots = 0, [], []
        for layer, mixer in enumerate(placement):
            shape = self.memory.layers[layer][mixer]
            count = shape.num_blocks(capacity, self.memory.page_tokens, speculative_tokens)
            pages[layer, :count] = ids[taken:taken + count]
            if isinstance(shape, AttentionShape):
                rings[layer] = count * self.memory.page_tokens
            elif count == 2:
                live.append(ids[taken])
                snapshots.append(ids[taken + 1])
            taken += count
        self.tables.set_row(row, pages, rings)
        self.arena.zero(torch.tensor(ids, dtype=torch.long, device=self.arena.data.device))
        blocks = SequenceBlocks(row, ids, placement, live, snapshots)
        self._held[row] = blocks
        return blocks

    def snapshot(self, held: list[SequenceBlocks]) -> None:
        """Copy each recurrent layer's state (and conv history) into its snapshot block: one copy for all."""
        self._copy([b for blocks in held for b in blocks.live], [b for blocks in held for b in blocks.snapshots])

    def restore(self, held: list[SequenceBlocks]) -> None:
        """Put the snapshots back: the recurrent layers are where ``snapshot`` left them."""
        self._copy([b for blocks in held for b in blocks.snapshots], [b for blocks in held for b in blocks.live])

    def _copy(self, source: list[int], target: list[int]) -> None:
        if source:
            words = self.arena.elements(torch.int32)  # whole blocks as 4-byte words (bit-exact, 4x fewer than bytes)
            index = torch.tensor(source + target, dtype=torch.long, device=words.device)
            words.index_copy_(0, index[len(source):], words.index_select(0, index[:len(source)]))

    def release(self, blocks: SequenceBlocks) -> None:
        """Give a finished sequence's blocks and row back (once)."""
        if self._held.get(blocks.row) is not blocks:
            raise RuntimeError(f"table row {blocks.row} is not held by these blocks (released twice?)")
        del self._held[blocks.row]
        # A free row points at the null block only: a padded row of a captured batch may use it.
        self.tables.set_row(blocks.row, np.full_like(self.tables.pages_host[blocks.row], NULL_BLOCK),
                            np.ones_like(self.tables.rings_host[blocks.row]))
        self._free_blocks.extend(reversed(blocks.block_ids))
        self._free_rows.append(blocks.row)

    def fill_random(self, generator: torch.Generator) -> None:
        """Random keys, values, states and conv histories in every held block (benchmarks and profiling time
        caches at a context without prefilling it; only sizes matter for speed)."""
        by_shape: dict = {}
        for blocks in self._held.values():
            pages = self.tables.pages_host[blocks.row]
            for layer, mixer in enumerate(blocks.placement):
                shape = self.memory.layers[layer][mixer]
                by_shape.setdefault(shape, []).extend(int(b) for b in pages[layer] if b != NULL_BLOCK)
        device, dtype = self.arena.data.device, self.arena.dtype
        for shape, ids in by_shape.items():
            index = torch.tensor(ids, dtype=torch.long, device=device)

            def noise(view: torch.Tensor, scale: float = 1.0, kind=dtype) -> torch.Tensor:
                size = (len(ids), *view.shape[1:])
                return torch.randn(size, generator=generator, device=device, dtype=kind) * scale

            if isinstance(shape, AttentionShape):
                pages_view = self.arena.kv(shape)
                pages_view.keys[index] = noise(pages_view.keys)
                pages_view.values[index] = noise(pages_view.values)
            else:
                slots = self.arena.states(shape, (shape.conv_channels,))
                slots.state[index] = noise(slots.state, 0.01, torch.float32)
                slots.conv[0][index] = noise(slots.conv[0])

    def check_invariants(self) -> None:
        """Every block is free or held by exactly one sequence; the null block by none."""
        held = [b for blocks in self._held.values() for b in blocks.block_ids]
        everything = held + self._free_blocks
        assert len(everything) == len(set(everything)) == self.usable_blocks, "a block is lost or owned twice"
        assert NULL_BLOCK not in everything, "the null block was lent out"
        assert len(self._held) + len(self._free_rows) == self.padding_row, "a table row is lost"
        for blocks in self._held.values():
            assert len(blocks.live) == len(blocks.snapshots) and set(blocks.live + blocks.snapshots) <= \
                set(blocks.block_ids), f"row {blocks.row}: snapshot blocks it does not hold"
        assert (self.tables.pages_host[self.padding_row] == NULL_BLOCK).all(), "the padding row points at a block"
        assert self.held_bytes == len(held) * self.block_bytes <= self.usable_bytes
