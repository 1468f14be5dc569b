"""The autoscaling decision: windowed load and quality signals -> the desired number of worker replicas.

Pure: no torch, no Ray, no clock (the time comes in with the signals). ``router/autoscaling.py``
reads the signals (Prometheus, or the replicas' own stats) and hands the answer to Ray Serve.

Degrade before scaling. Under a burst the router serves faster presets, so latency budgets keep
being met and the cost shows up as *quality debt*: the share of requests downgraded because of
load. The decision, each evaluation:

1. ``pressure`` (max over the hard signals of measured / target: SLA misses against the allowed
   share, p90 TTFT and TPOT against their budgets, queue wait against its target) above 1 means
   degrading did not absorb the load: scale up at once, by up to ``max_scale_up_factor``
   (``sla-pressure``);
2. quality debt above ``quality_debt_budget``: absorbed (``burst-absorbed``) until it has lasted
   ``debt_grace_s``, then one more replica (``quality-debt``), and the clock restarts;
3. calm (pressure and debt under ``calm_fraction`` of their thresholds, and the cache occupancy the
   remaining replicas would see under ``utilisation_low``) held for ``downscale_stable_s``:
   one replica fewer (``scale-down``), and the calm clock restarts; while calm lasts, one more every
   ``downscale_step_s`` (the first removal after any scale-up waits the whole stable period, the next
   ones only long enough for a window of signals measured without the replica removed);
4. otherwise hold (``steady``). Scale-ups wait ``upscale_cooldown_s`` after any change.

Scale-ups count from the replicas *running*: the signals measure them, not the ones still starting
(a 15B replica takes minutes to load). While replicas start, a scale-up happens only if the running
ones' pressure asks for more than the target already holds (``replicas-starting`` otherwise), so a
burst seen for several evaluations during one start-up does not double the target at each.

Utilisation is cache occupancy (bytes reserved / the replicas' cache budgets), not the share of time a
step runs: a continuously batching engine steps whenever any row runs, so its busy share is near 1 at
any load, while admission is bounded by cache bytes (whole-life reservations, ``policies/memory.py``).

Hysteresis is the gap between 1 (up) and ``calm_fraction`` (down); together with the calm period,
which any pressure resets, oscillating input cannot alternate the count up and down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from policies.errors import ConfigError

# Every reason decide() can return (a short code: it is a metric label).
REASONS = ("no-signals", "sla-pressure", "quality-debt", "burst-absorbed", "cooldown", "at-max-replicas",
           "replicas-starting", "scale-down", "steady", "below-min-replicas", "above-max-replicas")


@dataclass(frozen=True, slots=True)
class Signals:
    """What the fleet looked like over the last window. None: no data (e.g. no traffic with a budget)."""

    now_s: float  # seconds on any clock that does not go back
    replicas: int  # the replica count in force now (the target: some may still be starting)
    sla_attainment: float | None = None  # share of latency budget checks met (0..1)
    ttft_s: float | None = None  # p90 time to first token
    tpot_s: float | None = None  # p90 time per output token
    queue_wait_s: float | None = None  # mean wait in the workers' queues
    quality_debt: float | None = None  # share of requests served a faster preset because of load (0..1)
    utilisation: float | None = None  # cache occupancy of the running replicas (reserved / budget, 0..1)
    running: int | None = None  # replicas serving now (None: all of ``replicas``)

    @property
    def has_data(self) -> bool:
        return any(v is not None for v in (self.sla_attainment, self.ttft_s, self.tpot_s, self.queue_wait_s,
                                           self.quality_debt, self.utilisation))


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    sla_target: float = 0.95  # share of budget checks that must be met
    ttft_target_s: float | None = None  # p90 TTFT budget (None: not a signal)
    tpot_target_s: float | None = None  # p90 TPOT budget (None: not a signal)
    queue_wait_target_s: float | None = 1.0  # mean queue wait budget (None: not a signal)
    quality_debt_budget: float = 0.2  # share of load downgrades tolerated
    debt_grace_s: float = 120.0  # how long debt above budget is absorbed before a replica is added
    utilisation_low: float = 0.5  # scale down only if the remaining replicas' cache occupancy stays under this
    calm_fraction: float = 0.5  # down-thresholds are this share of the up-thresholds (hysteresis)
    upscale_cooldown_s: float = 30.0  # after any change, before the next scale-up
    downscale_stable_s: float = 300.0  # calm this long (and this long after a scale-up) to remove one
    downscale_step_s: float = 60.0  # after a removal, calm this long to remove the next (at least window_s)
    max_scale_up_factor: float = 2.0  # one scale-up multiplies the replicas by at most this

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"autoscaling needs 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                              f"({self.max_replicas})")
        if not 0 < self.sla_target <= 1:
            raise ConfigError(f"sla_target must be in (0, 1], got {self.sla_target}")
        for name in ("ttft_target_s", "tpot_target_s", "queue_wait_target_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 <= self.quality_debt_budget < 1:
            raise ConfigError(f"quality_debt_budget must be in [0, 1), got {self.quality_debt_budget}")
        if not 0 < self.utilisation_low <= 1 or not 0 < self.calm_fraction < 1:
            raise ConfigError("utilisation_low must be in (0, 1] and calm_fraction in (0, 1)")
        if min(self.debt_grace_s, self.upscale_cooldown_s, self.downscale_stable_s, self.downscale_step_s) < 0:
            raise ConfigError("autoscaling periods must not be negative")
        if self.max_scale_up_factor < 1:
            raise ConfigError(f"max_scale_up_factor must be at least 1, got {self.max_scale_up_factor}")


@dataclass(frozen=True, slots=True)
class ScalingState:
    """What decide() remembers between evaluations (plain numbers: it is stored as a dict by Serve)."""

    debt_since: float | None = None  # quality debt above budget since then
    calm_since: float | None = None  # calm since then
    changed_at: float | None = None  # the last change decide() asked for
    scaled_down_at: float | None = None  # the last scale-down (== changed_at: the last change was one)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def signals_from(raw: dict[str, float], replicas: int, running: int, now_s: float, window_s: float) -> Signals:
    """Signals from raw sums (PromQL results, the replicas' stats or bench/autoscale_sim.py; the names of
    ``router.autoscaling.queries``); absent: no data.
    ``replicas``: the count in force (Serve's target); ``running``: the replicas running now."""
    met, missed, shed = raw.get("met"), raw.get("missed"), raw.get("shed")
    checks = sum(v for v in (met, missed, shed) if v is not None)
    waiting, arrivals = raw.get("waiting"), raw.get("arrivals")
    queue_wait = _ratio(waiting, arrivals)  # Little's law: mean wait = mean queue length / arrival rate
    if queue_wait is None and waiting:
        queue_wait = window_s  # a queue that nothing enters or leaves: stuck for the whole window
    used, free = raw.get("cache_used"), raw.get("cache_free")
    occupancy = used / (used + free) if used is not None and free is not None and used + free > 0 else None
    return Signals(now_s, replicas, sla_attainment=(met or 0.0) / checks if checks else None,
                   ttft_s=raw.get("ttft"), tpot_s=raw.get("tpot"),
                   queue_wait_s=queue_wait if queue_wait is not None else (0.0 if waiting == 0 else None),
                   quality_debt=_ratio(raw.get("load_downgrades", 0.0), raw.get("routed")),
                   utilisation=occupancy, running=running)


def pressure(signals: Signals, config: ScalingConfig) -> float:
    """Measured / target over the hard signals (0 when none has data); above 1 a budget is broken."""
    ratios = [0.0]
    if signals.sla_attainment is not None:
        allowed = max(1.0 - config.sla_target, 1e-3)
        ratios.append((1.0 - signals.sla_attainment) / allowed)
    for value, target in ((signals.ttft_s, config.ttft_target_s), (signals.tpot_s, config.tpot_target_s),
                          (signals.queue_wait_s, config.queue_wait_target_s)):
        if value is not None and target is not None:
            ratios.append(value / target)
    return max(ratios)


def _calm(signals: Signals, config: ScalingConfig, load: float, replicas: int) -> bool:
    """Quality back, budgets comfortably met, and the replicas left after removing one lightly loaded."""
    if signals.utilisation is None or replicas <= 1 or (signals.running is not None and signals.running < replicas):
        return False  # (a replica still starting: the fleet was just found too small)
    debt = signals.quality_debt or 0.0
    return (load <= config.calm_fraction and debt <= config.calm_fraction * config.quality_debt_budget
            and signals.utilisation * replicas / (replicas - 1) <= config.utilisation_low)


def decide(signals: Signals, state: ScalingState, config: ScalingConfig) -> tuple[int, ScalingState, str]:
    """(desired replicas, new state, reason): see the module docstring for the rules."""
    now, replicas = signals.now_s, signals.replicas
    if replicas < config.min_replicas:
        return config.min_replicas, replace(state, changed_at=now, calm_since=None), "below-min-replicas"
    if replicas > config.max_replicas:
        return config.max_replicas, replace(state, changed_at=now, calm_since=None), "above-max-replicas"
    if not signals.has_data:  # e.g. the metrics source is down: change nothing, forget the clocks
        return replicas, replace(state, debt_since=None, calm_since=None), "no-signals"

    load = pressure(signals, config)
    in_debt = (signals.quality_debt or 0.0) > config.quality_debt_budget
    debt_since = (state.debt_since if state.debt_since is not None else now) if in_debt else None
    calm = _calm(signals, config, load, replicas)
    calm_since = (state.calm_since if state.calm_since is not None else now) if calm else None
    held = ScalingState(debt_since, calm_since, state.changed_at, state.scaled_down_at)
    cooling = state.changed_at is not None and now - state.changed_at < config.upscale_cooldown_s

    wants_up = None
    if load > 1:
        wants_up = "sla-pressure"
    elif in_debt and now - debt_since >= config.debt_grace_s:
        wants_up = "quality-debt"
    if wants_up is not None:
        if replicas >= config.max_replicas:
            return replicas, held, "at-max-replicas"
        if cooling:
            return replicas, held, "cooldown"
        # the signals measured the running replicas: scale from them; those starting already count
        running = replicas if signals.running is None else min(signals.running, replicas)
        factor = min(load, config.max_scale_up_factor) if wants_up == "sla-pressure" else 1.0
        target = min(max(math.ceil(running * factor), running + 1), config.max_replicas)
        if target <= replicas:
            return replicas, held, "replicas-starting"
        # the debt clock restarts: the next replica for debt needs another full grace period
        return target, ScalingState(now if in_debt else None, None, now, state.scaled_down_at), wants_up
    if in_debt:
        return replicas, held, "burst-absorbed"
    stepping_down = state.changed_at is not None and state.scaled_down_at == state.changed_at
    stable_s = config.downscale_step_s if stepping_down else config.downscale_stable_s
    if (calm and replicas > config.min_replicas and now - calm_since >= stable_s
            and (state.changed_at is None or now - state.changed_at >= stable_s)):
        return replicas - 1, ScalingState(None, now, now, now), "scale-down"
    return replicas, held, "steady"
