"""Engine settings: the cache budget, how much prefill one step may carry, how many rows may run."""

from __future__ import annotations

from dataclasses import dataclass

from policies.errors import ConfigError


@dataclass(slots=True)
class EngineConfig:
    """Checked once, at construction.

    ``cache_budget_bytes``: bytes all sequence caches together may hold. None: on CUDA,
    ``gpu_memory_fraction`` of the device memory free once the weights are loaded (the
    rest is left for activations); on a CPU it must be given.
    ``max_prefill_tokens``: prompt tokens one step may run, over all prefilling rows; a
    longer prompt is prefilled in chunks over several steps, beside the running decodes.
    ``max_running``: rows (admitted sequences) at most; decode batches never exceed it.
    ``step_history``: how many recent steps the stats keep.
    ``check_invariants``: run ``Engine.check_invariants()`` after every step (tests).
    ``page_tokens``: tokens per KV page of the cache pool; None (the default, and what the router's
    tables assume) derives it from the model (``policies.memory``). Smaller pages are for tests.
    ``decode_graphs``: replay uniform-placement decode steps from CUDA graphs (``graphs.py``): "auto" (capture
    on CUDA, off on a CPU), "capture", "eager" (the same static step, not captured), or "off".
    """

    cache_budget_bytes: int | None = None
    gpu_memory_fraction: float = 0.8
    max_prefill_tokens: int = 512
    max_running: int = 256
    step_history: int = 64
    check_invariants: bool = False
    page_tokens: int | None = None
    decode_graphs: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_budget_bytes is not None and self.cache_budget_bytes < 1:
            raise ConfigError(f"cache_budget_bytes must be positive, got {self.cache_budget_bytes}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens must be at least 1, got {self.max_prefill_tokens}")
        if self.max_running < 1:
            raise ConfigError(f"max_running must be at least 1, got {self.max_running}")
        if self.page_tokens is not None and self.page_tokens < 1:
            raise ConfigError(f"page_tokens must be at least 1, got {self.page_tokens}")
        if self.decode_graphs not in ("auto", "capture", "eager", "off"):
            raise ConfigError(f"decode_graphs must be auto, capture, eager or off, got {self.decode_graphs!r}")
        if self.step_history < 1:
            raise ConfigError(f"step_history must be at least 1, got {self.step_history}")
