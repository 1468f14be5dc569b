"""A 15B-shaped world for routing tests: the roofline speed table, presets with the published mixer counts."""

from __future__ import annotations

import pytest

from policies.cost import SpeedModel
from policies.memory import AttentionShape, CacheMemoryModel, DeltaRuleShape
from policies.placement import Mixer, Placement
from policies.roofline import roofline_speed_dict
from policies.routing import PresetInfo
from policies.routing.predict import Predictor
from policies.routing.types import RunningRow, WorkerState
from policies.tables import SpeedFile

LAYER = {
    Mixer.ATTENTION: AttentionShape(8, 128),
    Mixer.SLIDING_WINDOW: AttentionShape(8, 128, 4096),
    Mixer.GDN: DeltaRuleShape(32, 128, 128, 2 * 1024 + 4096, 4),
    Mixer.KDA: DeltaRuleShape(32, 128, 128, 3 * 4096, 4),
}
MEMORY = CacheMemoryModel((LAYER,) * 48, kv_bytes=2, state_bytes=4)
GIB = 2**30


def spread(counts: dict[str, int]) -> Placement:
    """A placement with these mixer counts, each mixer spread evenly over the depth."""
    slots = []
    for name, n in counts.items():
        slots += [((i + 0.5) / n, name) for i in range(n)]
    return Placement.parse([name for _, name in sorted(slots)])


PRESETS = [
    PresetInfo("all-attention", Placement.uniform("attention", 48), 1.00),
    PresetInfo("lklhd-26", spread({"attention": 12, "sliding_window": 26, "kda": 6, "gdn": 4}), 0.96),
    PresetInfo("lklhd-18", spread({"attention": 3, "sliding_window": 25, "kda": 4, "gdn": 16}), 0.94),
    PresetInfo("lklhd-13", spread({"sliding_window": 16, "kda": 13, "gdn": 19}), 0.81),
    PresetInfo("lklhd-10", spread({"sliding_window": 10, "kda": 5, "gdn": 33}), 0.77),
]


@pytest.fixture(scope="session")
def speed():
    return SpeedModel.from_file(SpeedFile.model_validate(roofline_speed_dict(MEMORY)))


@pytest.fixture()
def predictor(speed):
    return Predictor(speed, PRESETS)


def busy_worker(name: str, rows: int, context: int, placement=None, budget=25 * GIB, waiting=0) -> WorkerState:
    placement = placement or PRESETS[0].placement
    running = tuple(RunningRow(placement, context, 200, MEMORY.sequence_bytes(placement, context + 200))
                    for _ in range(rows))
    used = sum(r.cache_bytes for r in running)
    return WorkerState(name, running, waiting_requests=waiting, waiting_prompt_tokens=waiting * 2000,
                       cache_budget_bytes=budget, cache_used_bytes=min(used, budget))
