"""What one forward pass runs: rows of new tokens, each with its own placement and cache.

Tokens of all rows are laid out flat (``[total_tokens, hidden]``), as in
nano-vllm; a row is a contiguous span. Each layer groups rows by the mixer
their placement gives that layer (``RowGroup``), runs each group and puts the
rows back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from policies.placement import Mixer, Placement
from workers.model.cache import LayerCache, SequenceCache


class Row:
    """A contiguous span of new tokens for one sequence."""

    __slots__ = ("offset", "length", "start")

    def __init__(self, offset: int, length: int, start: int):
        self.offset = offset  # first token of the span in the flat batch
        self.length = length  # number of new tokens
        self.start = start  # absolute position of the first new token (tokens already cached)


class RowGroup:
    """The rows of a batch that run one mixer in one layer, re-based onto their gathered tokens."""

    __slots__ = ("rows", "caches", "positions", "token_index")

    def __init__(self, rows: list[Row], caches: list[LayerCache] | None, positions: torch.Tensor,
                 token_index: torch.Tensor | None):
        self.rows = rows
        self.caches = caches  # None: no cache (a full recompute from position 0)
        self.positions = positions
        self.token_index = token_index  # None when the group is the whole batch

    @property
    def dense_length(self) -> int | None:
        """The common row length when every row starts at 0 without a cache (training, scoring), else None.

        Such a group is a dense [rows, length] block: the mixers run it batched, with no per-row loop.
        """
        if self.caches is not None:
            return None
        length = self.rows[0].length
        return length if all(row.length == length for row in self.rows) else None

    @property
    def is_decode(self) -> bool:
        """Every row adds exactly one token: the mixers can batch rows without per-row loops."""
        return all(row.length == 1 for row in self.rows)


class ForwardBatch:
    __slots__ = ("token_ids", "positions", "rows", "placements", "caches", "_gathers")

    def __init__(self, token_ids: torch.Tensor, rows: list[Row], placements: Sequence[Placement],
                 caches: Sequence[SequenceCache] | None):
        self.token_ids = token_ids
        self.rows = rows
        self.placements = list(placements)
        self.caches = list(caches) if caches is not None else None
        self._gathers: dict[tuple[int, ...], tuple[list[Row], torch.Tensor, torch.Tensor]] = {}
        self.positions = torch.cat(
            [torch.arange(r.start, r.start + r.length) for r in rows]
        ).to(token_ids.device)

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]], placements: Sequence[Placement],
              caches: Sequence[SequenceCache] | None = None, device=None) -> "ForwardBatch":
        """New tokens per sequence; each starts where its cache left off (or at 0 without caches)."""
        rows, offset = [], 0
        for i, tokens in enumerate(sequences):
            if not tokens:
                raise ValueError(f"row {i} has no new tokens")
            start = caches[i].length if caches is not None else 0
            rows.append(Row(offset, len(tokens), start))
            offset += len(tokens)
        flat = torch.tensor([t for tokens in sequences for t in tokens], dtype=torch.long, device=device)
        return cls(flat, rows, placements, caches)

    @classmethod
    def dense(cls, token_ids: torch.Tensor, placements: Sequence[Placement]) -> "ForwardBatch":
        """Equal-length rows from position 0 without caches (training, scoring): ``token_ids`` [rows, length]."""
        rows, length = token_ids.shape
        return cls(token_ids.reshape(-1), [Row(r * length, length, 0) for r in range(rows)], placements, None)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def last_token_index(self) -> torch.Tensor:
        return torch.tensor([r.offset + r.length - 1 for r in self.rows], device=self.token_ids.device)

    def groups(self, layer: int) -> dict[Mixer, RowGroup]:
        """Rows grouped by the mixer their placement runs at ``layer``."""
        by_mixer: dict[Mixer, list[int]] = {}
        for i, placement in enumerate(self.placements):
            by_mixer.setdefault(placement[layer], []).append(i)
        if len(by_mixer) == 1:
            mixer = next(iter(by_mixer))
            caches = None if self.caches is None else [cache.layers[layer] for cache in self.caches]
            return {mixer: RowGroup(self.rows, caches, self.positions, None)}
        groups = {}
        for mixer, members in by_mixer.items():
            rows, index, positions = self._gather(tuple(members))
            caches = None if self.caches is None else [self.caches[i].layers[layer] for i in members]
            groups[mixer] = RowGroup(rows, caches, positions, index)
        return groups

    def _gather(self, members: tuple[int, ...]) -> tuple[list[Row], torch.Tensor, torch.Tensor]:
        """The members' rows re-based onto their gathered tokens, the token index and its positions: built
        once per distinct set of rows (layers often share one) with a single host-to-device copy."""
        gather = self._gathers.get(members)
        if gather is None:
            rows, tokens, offset = [], [], 0
            for i in members:
                row = self.rows[i]
                rows.append(Row(offset, row.length, row.start))
                tokens.extend(range(row.offset, row.offset + row.length))
                offset += row.length
            index = torch.tensor(tokens, device=self.token_ids.device)
            gather = self._gathers[members] = (rows, index, self.positions[index])
        return gather
