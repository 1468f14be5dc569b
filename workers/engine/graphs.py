"""Decode steps replayed from CUDA graphs: one graph per (placement, batch bucket), captured on first use.

A decode step of a few dozen rows is thousands of small kernel launches; on a
GPU the launches alone can take longer than the step's reads. A CUDA graph
records one step's launches once and replays them with one call. What makes a
step replayable:

- every index it reads lives in persistent device buffers (token ids,
  positions, block-table rows), written in place before each replay with one
  host-to-device copy; the step builds its metadata from them with device
  ops only (``ForwardBatch.static_decode``), inside the captured region;
- its launches do not depend on the rows: the Triton decode kernels take block
  tables and state indices, and read every row's whole page table (each row
  stops at its own length inside the kernel);
- a batch of n rows runs the smallest bucket >= n; the rows past n are padding
  that point at the pool's padding row (all null blocks): the recurrent
  kernels skip them and attention writes only into the null block.

Captured: decode steps where every row runs one placement (each placement has
its own graph: a layer's mixer is part of the recorded launches). Steps with
prefill rows or several placements run eagerly. ``mode="eager"`` runs the very
same static-buffer step without capturing it (on a CPU, in the tests; on a GPU,
to tell a capture problem from a step problem).
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from policies.errors import ConfigError
from policies.placement import Placement
from workers.engine.pool import CachePool
from workers.model.batch import ForwardBatch
from workers.model.supernet import SupernetLM

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    __slots__ = ("model", "pool", "mode", "buckets", "_buffers", "_staging", "_graphs", "_memory", "captures",
                 "steps")

    def __init__(self, model: SupernetLM, pool: CachePool, max_rows: int, mode: str = "capture"):
        if mode not in ("capture", "eager"):
            raise ConfigError(f"decode graphs mode must be 'capture' or 'eager', got {mode!r}")
        if mode == "capture" and model.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, the model is on {model.device} "
                              "(set decode_graphs to 'off', or 'eager' to run the static step without capture)")
        self.model, self.pool, self.mode = model, pool, mode
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        largest = self.buckets[-1]
        # [3, largest]: token ids, positions, table rows; each bucket's graph reads the first `bucket` columns.
        self._buffers = torch.zeros(3, largest, dtype=torch.int64, device=model.device)
        pinned = model.device.type == "cuda"
        self._staging = torch.zeros(3, largest, dtype=torch.int64, pin_memory=pinned)
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._memory = torch.cuda.graph_pool_handle() if mode == "capture" else None  # shared by every graph
        self.captures = 0  # graphs recorded
        self.steps = 0  # steps run from the static buffers (replayed, or eager)

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def accepts(self, placements: list[Placement], token_ids: list[list[int]]) -> bool:
        """A step it replays: every row decodes one token under one placement, and the rows fit a bucket."""
        return (0 < len(placements) <= self.max_rows and all(len(t) == 1 for t in token_ids)
                and all(p.code == placements[0].code for p in placements))

    def run(self, placement: Placement, token_ids: list[int], positions: list[int], table_rows: list[int]):
        """Logits [rows, vocab] of one decode step (the buffer's rows: read before the next ``run``)."""
        rows = len(token_ids)
        bucket = self.buckets[bisect.bisect_left(self.buckets, rows)]
        key = (placement.code, bucket)
        if self.mode == "capture" and key not in self._graphs:
            self._graphs[key] = self._capture(placement, bucket)  # before the rows are in the buffers
        staging = self._staging[:, :bucket]
        staging[0, :rows] = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))
        staging[1, :rows] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        staging[2, :rows] = torch.from_numpy(np.asarray(table_rows, dtype=np.int64))
        self._pad(staging, rows)
        self._buffers[:, :bucket].copy_(staging, non_blocking=True)
        self.steps += 1
        if self.mode == "eager":
            return self._forward(placement, bucket)[:rows]
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:rows]

    def _pad(self, staging: torch.Tensor, rows: int) -> None:
        staging[0, rows:] = 0
        staging[1, rows:] = 0
        staging[2, rows:] = self.pool.padding_row

    def _forward(self, placement: Placement, bucket: int) -> torch.Tensor:
        tokens, positions, table_rows = self._buffers[:, :bucket]
        return self.model(ForwardBatch.static_decode(tokens, positions, table_rows, placement, self.pool.arena,
                                                     self.pool.tables))

    def _capture(self, placement: Placement, bucket: int):
        """Record one step of ``bucket`` padding rows (they touch only the null block), after two warm-up runs
        on a side stream (Triton compiles, lazily built tensors get made) as PyTorch's capture recipe asks."""
        self._pad(self._staging[:, :bucket], 0)
        self._buffers[:, :bucket].copy_(self._staging[:, :bucket])
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(placement, bucket)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory):
            logits = self._forward(placement, bucket)
        self.captures += 1
        return graph, logits
