"""The Super Apriel release's published presets and the paper's linear cost models.

Data from the model card (decode throughput against all-attention on an H100;
see design/SUPERNET.md). Only mixer counts are public, not which layer runs which
mixer. The number in a preset's name is its cost budget in FA-layer units
under its cost model, truncated (Reg/Lklhd-26 costs 26.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from policies.errors import UnknownPreset
from policies.placement import Mixer

# Cost per layer in FA-layer units, linear in per-mixer counts.
REGRESSION_COST = MappingProxyType(
    {Mixer.ATTENTION: 1.00, Mixer.SLIDING_WINDOW: 0.48, Mixer.KDA: 0.21, Mixer.GDN: 0.14}
)
IDEALIZED_COST = MappingProxyType(
    {Mixer.ATTENTION: 1.00, Mixer.SLIDING_WINDOW: 0.16, Mixer.KDA: 0.11, Mixer.GDN: 0.09}
)
COST_MODELS = MappingProxyType({"regression": REGRESSION_COST, "idealized": IDEALIZED_COST})


@dataclass(frozen=True, slots=True)
class PublishedPreset:
    name: str
    num_attention: int
    num_sliding_window: int
    num_kda: int
    num_gdn: int
    speedup_32k: float  # decode throughput against all-attention at 32k context
    speedup_16k: float
    avg_score: float
    retention_pct: int  # avg_score against all-attention's, in percent
    cost_model: str | None  # which COST_MODELS entry its name's budget uses; None for the baseline

    def counts(self) -> dict[Mixer, int]:
        return {
            Mixer.ATTENTION: self.num_attention,
            Mixer.SLIDING_WINDOW: self.num_sliding_window,
            Mixer.GDN: self.num_gdn,
            Mixer.KDA: self.num_kda,
        }

    @property
    def num_layers(self) -> int:
        return self.num_attention + self.num_sliding_window + self.num_kda + self.num_gdn


PUBLISHED_PRESETS: tuple[PublishedPreset, ...] = (
    PublishedPreset("all-attention", 48, 0, 0, 0, 1.0, 1.0, 74.2, 100, None),
    PublishedPreset("Reg/Lklhd-26", 12, 26, 6, 4, 2.85, 1.5, 71.1, 96, "regression"),
    PublishedPreset("Idealized/All-18", 13, 32, 1, 2, 1.99, 1.1, 71.8, 97, "idealized"),
    PublishedPreset("Reg/Lklhd-18", 3, 25, 4, 16, 4.76, 2.2, 69.7, 94, "regression"),
    PublishedPreset("Idealized/Lklhd-6", 0, 30, 5, 13, 6.2, 2.4, 66.8, 90, "idealized"),
    PublishedPreset("Idealized/All-6", 0, 30, 5, 13, 6.13, 2.5, 65.3, 88, "idealized"),
    PublishedPreset("Reg/Lklhd-13", 0, 16, 13, 19, 6.9, 2.7, 60.2, 81, "regression"),
    PublishedPreset("Reg/Lklhd-10", 0, 10, 5, 33, 10.69, 4.2, 57.2, 77, "regression"),
)


def published_preset(name: str) -> PublishedPreset:
    for preset in PUBLISHED_PRESETS:
        if preset.name == name:
            return preset
    known = ", ".join(p.name for p in PUBLISHED_PRESETS)
    raise UnknownPreset(f"no published preset {name!r}: known are {known}")
