"""What one forward pass runs: rows of new tokens, each with its own placement, and where their caches live.

Tokens of all rows are laid out flat (``[total_tokens, hidden]``), as in
nano-vllm; a row is a contiguous span. Everything a step needs besides the
weights is built here once, before the forward (nano-vllm's ``prepare_decode``):
positions; for each layer, the rows each mixer runs (a ``RowSet`` per distinct
set of rows, shared by every layer that groups the same rows, with its rotary
cos/sin computed once); and with a cache, every token's write slot on every
layer. The host-side indices travel to the device in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from policies.placement import Mixer, Placement
from workers.model.cache import NULL_BLOCK, BlockTables, CacheArena


class Row:
    """A contiguous span of new tokens for one sequence."""

    __slots__ = ("offset", "length", "start")

    def __init__(self, offset: int, length: int, start: int):
        self.offset = offset  # first token of the span in the flat batch (or in its RowSet)
        self.length = length  # number of new tokens
        self.start = start  # absolute position of the first new token (tokens already cached)


class CacheRows:
    """Where a batch's rows keep their caches: the arena, the block table and each row's table row."""

    __slots__ = ("arena", "tables", "rows")

    def __init__(self, arena: CacheArena, tables: BlockTables, rows: Sequence[int]):
        self.arena, self.tables, self.rows = arena, tables, list(rows)


class RowSet:
    """Rows of a batch that run one mixer together at some layer, re-based onto their gathered tokens.

    ``token_index`` / ``row_index``: the set's tokens / rows in the batch (None: the whole batch; a slice when
    they are one run, as they are after the runner orders rows by placement).
    ``decode_tokens`` / ``decode_rows``: its one-token rows' tokens / rows within the set (None: every row
    has one token). ``prefill``: indices of its rows of several tokens, which the mixers run one by one.
    """

    __slots__ = ("members", "rows", "token_index", "row_index", "positions", "decode_tokens", "decode_rows",
                 "num_decode", "prefill", "table_rows", "last_tokens", "_rotary")

    def __init__(self, members: tuple[int, ...] | None, rows: list[Row]):
        self.members, self.rows = members, rows
        self.token_index = self.row_index = self.decode_tokens = self.decode_rows = None
        self.positions = self.table_rows = self.last_tokens = None
        self.prefill = [i for i, row in enumerate(rows) if row.length > 1]
        self.num_decode = len(rows) - len(self.prefill)
        self._rotary: dict = {}

    @property
    def is_decode(self) -> bool:
        return not self.prefill


class RowGroup:
    """The rows that run one mixer at one layer: a RowSet, and (with a cache) that layer's view of it."""

    __slots__ = ("set", "layer", "batch")

    def __init__(self, rows: RowSet, layer: int, batch: "ForwardBatch"):
        self.set, self.layer, self.batch = rows, layer, batch

    rows = property(lambda self: self.set.rows)
    positions = property(lambda self: self.set.positions)
    token_index = property(lambda self: self.set.token_index)
    is_decode = property(lambda self: self.set.is_decode)

    @property
    def dense_length(self) -> int | None:
        """The common row length when every row starts at 0 without a cache (training, scoring), else None.

        Such a group is a dense [rows, length] block: the mixers run it batched, with no per-row loop.
        """
        if self.batch.cache is not None:
            return None
        length = self.rows[0].length
        return length if all(row.length == length and row.start == 0 for row in self.rows) else None

    def cos_sin(self, rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin at the set's positions: computed once per step, gathered once per set."""
        key = (rotary.head_size, rotary.theta, dtype)
        found = self.set._rotary.get(key)
        if found is None:
            cos, sin = self.batch.cos_sin(rotary, key)
            if self.set.token_index is not None:
                cos, sin = cos[self.set.token_index], sin[self.set.token_index]
            found = self.set._rotary[key] = (cos, sin)
        return found

    @property
    def cache(self) -> "StepCache | None":
        return self.batch.cache

    # ---- cache addressing at this layer (batch.cache is set) ----

    def write_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) where each of the group's new tokens' keys and values go at this layer."""
        cache, index = self.batch.cache, self.set.token_index
        pages = cache.write_page[:, self.layer]
        return (pages, cache.write_offset) if index is None else (pages[index], cache.write_offset[index])

    def blocks(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The block each of the group's rows (or of ``rows`` within it) holds at this (recurrent) layer."""
        table_rows = self.set.table_rows if rows is None else self.set.table_rows[rows]
        return self.batch.cache.tables.pages[table_rows, self.layer, 0]

    def decode_layout(self, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For the one-token rows at this layer (a mixer of ``shape``): their block-table rows, positions and
        rings (device tensors), and the most pages any of them reads (all of them when the batch is static)."""
        cache, rows = self.batch.cache, self.set
        key = (id(rows), shape)
        found = cache.memo.get(key)
        if found is None:
            table_rows = rows.table_rows if rows.decode_rows is None else rows.table_rows[rows.decode_rows]
            positions = rows.positions if rows.decode_tokens is None else rows.positions[rows.decode_tokens]
            rings = cache.tables.rings[table_rows, self.layer]
            pages = cache.static_pages or cache.pages_read(rows, self.layer)
            found = cache.memo[key] = (table_rows, positions, rings, pages)
        return found

    def decode_pages(self, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``decode_layout`` with the rows' page tables at this layer [rows, P] in place of their table rows."""
        table_rows, positions, rings, pages = self.decode_layout(shape)
        return self.batch.cache.tables.pages[table_rows, self.layer, :pages], positions, rings, pages

    def decode_blocks(self) -> torch.Tensor:
        """The block each one-token row holds at this (recurrent) layer, on the device (the GPU kernels')."""
        cache, rows = self.batch.cache, self.set
        key = (id(rows), self.layer, "blocks")
        found = cache.memo.get(key)
        if found is None:
            found = cache.memo[key] = self.blocks(rows.decode_rows)
        return found

    def decode_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays of the one-token rows (for CPU kernels): their block-table rows and positions."""
        cache, rows = self.batch.cache, self.set
        key = (id(rows), "host")
        found = cache.memo.get(key)
        if found is None:
            picked = [i for i, row in enumerate(rows.rows) if row.length == 1]
            batch_rows = picked if rows.members is None else [rows.members[i] for i in picked]
            positions = np.array([rows.rows[i].start for i in picked], dtype=np.int64)
            found = cache.memo[key] = (cache.table_rows_host[batch_rows], positions)
        return found

    def decode_blocks_host(self) -> np.ndarray:
        """The block each one-token row holds at this (recurrent) layer, on the host."""
        return self.batch.cache.tables.pages_host[self.decode_host()[0], self.layer, 0]

    def decode_mask(self, shape, span: int) -> torch.Tensor:
        """Which of the gathered slots [rows, 1, 1, span] each one-token row sees. Slot j of a row's pages
        holds position p - ((p - j) mod ring): visible when that is >= 0 and inside the window, and j is one
        of the row's own slots (j < ring)."""
        cache = self.batch.cache
        key = (id(self.set), shape, "mask")
        found = cache.memo.get(key)
        if found is None:
            _, positions, rings, _ = cache.memo[(id(self.set), shape)]
            slot = torch.arange(span, device=positions.device)
            back = (positions[:, None] - slot) % rings[:, None]  # how many tokens before p slot j's token is
            visible = (back <= positions[:, None]) & (slot < rings[:, None])
            if shape.window is not None:
                visible &= back < shape.window
            found = cache.memo[key] = visible[:, None, None, :]
        return found

    def history(self, r: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row ``r``'s cached keys visible to its new tokens at this layer: (pages, offsets, positions)."""
        row, cache = self.rows[r], self.batch.cache
        table_row = cache.table_rows_host[self.set.members[r] if self.set.members is not None else r]
        first = 0 if window is None else max(0, row.start - window + 1)
        positions = np.arange(first, row.start)
        local = positions % cache.tables.rings_host[table_row, self.layer]
        pages = cache.tables.pages_host[table_row, self.layer, local // cache.page_tokens]
        device = cache.write_offset.device
        return tuple(torch.from_numpy(a).to(device) for a in (pages, local % cache.page_tokens, positions))


class StepCache:
    """One step's view of the pool: per token and layer the page it writes, the offset, and table rows."""

    __slots__ = ("arena", "tables", "table_rows_host", "write_page", "write_offset", "page_tokens", "memo",
                 "static_pages", "ends_host")

    @property
    def host_rows(self) -> bool:
        """Whether the rows' positions and table rows are known on the host (not in a captured batch, whose
        buffers change between replays): the CPU kernels and prefill rows need them."""
        return self.table_rows_host is not None

    def pages_read(self, rows: RowSet, layer: int) -> int:
        """The most pages a one-token row of ``rows`` reads at ``layer``: ceil(min(position + 1, ring) / page)."""
        picked = np.array([i for i, row in enumerate(rows.rows) if row.length == 1])
        batch_rows = picked if rows.members is None else np.asarray(rows.members)[picked]
        table_rows = self.table_rows_host[batch_rows]
        held = np.minimum(self.ends_host[batch_rows], self.tables.rings_host[table_rows, layer])
        return int(-(-held.max() // self.page_tokens))


class ForwardBatch:
    __slots__ = ("token_ids", "positions", "positions_host", "rows", "placements", "cache", "_sets", "_groups",
                 "_cos_sin", "logit_index")

    def __init__(self, token_ids: list[int] | torch.Tensor, rows: list[Row], placements: Sequence[Placement],
                 cache: CacheRows | None = None, device=None, static_pages: int | None = None):
        self.rows, self.placements = rows, list(placements)
        device = token_ids.device if isinstance(token_ids, torch.Tensor) else device
        self._cos_sin: dict = {}
        self.logit_index: torch.Tensor | None = None  # tokens whose logits forward() returns (None: each row's last)
        # Which rows run which mixer at each layer; one RowSet per distinct set of rows.
        layers = len(self.placements[0]) if self.placements else 0
        whole = RowSet(None, rows)
        self._sets: dict[tuple[int, ...] | None, RowSet] = {None: whole}
        self._groups: list[dict[Mixer, RowSet]] = []
        for layer in range(layers):
            by_mixer: dict[Mixer, list[int]] = {}
            for i, placement in enumerate(self.placements):
                by_mixer.setdefault(placement[layer], []).append(i)
            groups = {}
            for mixer, members in by_mixer.items():
                key = None if len(members) == len(rows) else tuple(members)
                if key not in self._sets:
                    self._sets[key] = self._rebase(key)
                groups[mixer] = self._sets[key]
            self._groups.append(groups)
        # Host-side indices, packed into one array: one host-to-device copy.
        starts = np.array([r.start for r in rows], dtype=np.int64)
        lengths = np.array([r.length for r in rows], dtype=np.int64)
        token_row = np.repeat(np.arange(len(rows)), lengths)
        positions = np.arange(len(token_row)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + starts[token_row]
        self.positions_host = positions
        parts = {"positions": positions}
        if not isinstance(token_ids, torch.Tensor):
            parts["token_ids"] = np.asarray(token_ids, dtype=np.int64)
        if cache is not None:
            parts["table_rows"] = np.asarray(cache.rows, dtype=np.int64)
            if len(token_row) != len(rows):
                parts["token_row"] = token_row
        for key, rows_set in self._sets.items():
            parts.update(self._set_indices(key, rows_set, lengths))
        flat = torch.from_numpy(np.concatenate(list(parts.values()))).to(device)
        views, at = {}, 0
        for name, array in parts.items():
            views[name], at = flat[at:at + len(array)], at + len(array)
        self.token_ids = token_ids if isinstance(token_ids, torch.Tensor) else views["token_ids"]
        self.positions = views["positions"]
        for key, rows_set in self._sets.items():
            self._attach(key, rows_set, views)
        self.cache = None if cache is None else self._step_cache(cache, views, starts, lengths, static_pages)

    # ---- builders ----

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]], placements: Sequence[Placement],
              starts: Sequence[int] | None = None, cache: CacheRows | None = None, device=None,
              static_pages: int | None = None) -> "ForwardBatch":
        """New tokens per sequence, each starting at ``starts[i]`` tokens already cached (0 without a cache)."""
        rows, offset = [], 0
        for i, tokens in enumerate(sequences):
            if not tokens:
                raise ValueError(f"row {i} has no new tokens")
            rows.append(Row(offset, len(tokens), 0 if starts is None else int(starts[i])))
            offset += len(tokens)
        if cache is None and any(r.start for r in rows):
            raise ValueError("rows that continue from cached tokens need a cache")
        flat = [t for tokens in sequences for t in tokens]
        return cls(flat, rows, placements, cache, device, static_pages)

    @classmethod
    def dense(cls, token_ids: torch.Tensor, placements: Sequence[Placement]) -> "ForwardBatch":
        """Equal-length rows from position 0 without caches (training, scoring): ``token_ids`` [rows, length]."""
        rows, length = token_ids.shape
        return cls(token_ids.reshape(-1), [Row(r * length, length, 0) for r in range(rows)], placements)

    # ---- per step ----

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def groups(self, layer: int) -> dict[Mixer, RowGroup]:
        """Rows grouped by the mixer their placement runs at ``layer``."""
        return {mixer: RowGroup(rows, layer, self) for mixer, rows in self._groups[layer].items()}

    def last_token_index(self) -> torch.Tensor | None:
        """Each row's last token in the flat batch; None when every row has one token (they all are)."""
        return self._sets[None].last_tokens

    def cos_sin(self, rotary, key) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._cos_sin.get(key)
        if found is None:
            found = self._cos_sin[key] = rotary.cos_sin(self.positions, key[2])
        return found

    # ---- internals ----

    def _rebase(self, members: tuple[int, ...]) -> RowSet:
        rows, offset = [], 0
        for i in members:
            row = self.rows[i]
            rows.append(Row(offset, row.length, row.start))
            offset += row.length
        return RowSet(members, rows)

    def _set_indices(self, key, rows_set: RowSet, lengths: np.ndarray) -> dict[str, np.ndarray]:
        parts, name = {}, f"set{id(rows_set)}"
        if key is not None and key[-1] - key[0] + 1 != len(key):  # not one run of rows: index tensors
            members = np.asarray(key, dtype=np.int64)
            offsets = np.cumsum(lengths) - lengths
            parts[f"{name}.rows"] = members
            parts[f"{name}.tokens"] = np.concatenate([np.arange(offsets[i], offsets[i] + lengths[i]) for i in key])
        if rows_set.prefill and rows_set.num_decode:
            decode = [i for i, row in enumerate(rows_set.rows) if row.length == 1]
            parts[f"{name}.decode_rows"] = np.asarray(decode, dtype=np.int64)
            parts[f"{name}.decode_tokens"] = np.asarray([rows_set.rows[i].offset for i in decode], dtype=np.int64)
        if key is None and len(lengths) != len(self.positions_host):
            parts[f"{name}.last"] = np.cumsum(lengths) - 1  # (one token per row: every token is a last one)
        return parts

    def _attach(self, key, rows_set: RowSet, views: dict) -> None:
        name = f"set{id(rows_set)}"
        rows_set.row_index = views.get(f"{name}.rows")
        rows_set.token_index = views.get(f"{name}.tokens")
        if key is not None and rows_set.row_index is None:  # one run of rows: views, not gathers
            first, last = self.rows[key[0]], self.rows[key[-1]]
            rows_set.row_index = slice(key[0], key[-1] + 1)
            rows_set.token_index = slice(first.offset, last.offset + last.length)
        rows_set.decode_rows = views.get(f"{name}.decode_rows")
        rows_set.decode_tokens = views.get(f"{name}.decode_tokens")
        rows_set.positions = self.positions if key is None else self.positions[rows_set.token_index]
        if key is None:
            rows_set.last_tokens = views.get(f"{name}.last")

    def _step_cache(self, cache: CacheRows, views: dict, starts, lengths, static_pages) -> StepCache:
        step = StepCache()
        step.arena, step.tables, step.page_tokens = cache.arena, cache.tables, cache.arena.page_tokens
        step.memo, step.static_pages = {}, static_pages
        step.table_rows_host = np.asarray(cache.rows, dtype=np.int64)
        step.ends_host = starts + lengths
        table_rows = views["table_rows"]
        for key, rows_set in self._sets.items():
            rows_set.table_rows = table_rows if key is None else table_rows[rows_set.row_index]
        token_rows = table_rows if "token_row" not in views else table_rows[views["token_row"]]
        page, rings = _write_pages(cache.tables, token_rows, self.positions, step.page_tokens)
        ends = starts + lengths  # a row of more tokens than a ring holds writes only its last ring's worth
        rings_host = cache.tables.rings_host[step.table_rows_host]
        if (lengths[:, None] > rings_host).any():
            last = torch.from_numpy(np.repeat(ends - 1, lengths)).to(rings.device)
            page = torch.where((last - self.positions)[:, None] < rings, page, NULL_BLOCK)
        step.write_page, step.write_offset = page, self.positions % step.page_tokens
        return step

    @classmethod
    def static_decode(cls, token_ids: torch.Tensor, positions: torch.Tensor, table_rows: torch.Tensor,
                      placement: Placement, arena: CacheArena, tables: BlockTables) -> "ForwardBatch":
        """One token per row, one placement, every index already on the device in persistent buffers (a
        captured decode step, ``workers/engine/graphs.py``): built with device ops only, so a CUDA graph can
        record it, and reading every row's full page table (``static_pages``) so its launches never change."""
        self = cls.__new__(cls)
        rows = token_ids.shape[0]
        self.rows = [Row(i, 1, 0) for i in range(rows)]  # (starts live on the device only)
        self.placements = [placement] * rows
        self._cos_sin = {}
        self.logit_index = None
        whole = RowSet(None, self.rows)
        whole.positions, whole.table_rows = positions, table_rows
        self._sets = {None: whole}
        self._groups = [{mixer: whole} for mixer in placement]
        self.token_ids, self.positions, self.positions_host = token_ids, positions, None
        step = StepCache()
        step.arena, step.tables, step.page_tokens = arena, tables, arena.page_tokens
        step.memo, step.static_pages = {}, tables.max_pages
        step.table_rows_host = step.ends_host = None
        step.write_page, _ = _write_pages(tables, table_rows, positions, step.page_tokens)
        step.write_offset = positions % step.page_tokens
        self.cache = step
        return self


def _write_pages(tables: BlockTables, token_rows: torch.Tensor, positions: torch.Tensor,
                 page_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's write page on every layer, ``table[(p % ring) // page]`` [T, L], and the rings [T, L]."""
    rings = tables.rings[token_rows]
    local = positions[:, None] % rings
    layers = torch.arange(rings.shape[1], device=rings.device)
    return tables.pages[token_rows[:, None], layers[None, :], local // page_tokens], rings
