"""Autoscaling in the simulator: the live decision (policies/autoscaling.decide) on a daily trace with bursts, three fleets.

Variants, on the same seeded trace and the same simulated replicas as bench/simulate.py (bench/simcore.py):

- ``static``: a fleet sized for the trace's peak (``ceil(peak rate / --replica-rate)``; --replica-rate is
  what one replica serves on all-attention within its budgets: bench/simulate.py's sweep meets 94.5% with
  4 replicas at 4 requests/s), routing fixed all-attention;
- ``scale-only``: the autoscaler, routing fixed all-attention (no downgrades: it scales on SLA pressure);
- ``degrade-first``: the autoscaler, the SLA policy (faster presets first, then replicas for quality debt).

The autoscaler is the live one: every ``interval_s`` it computes the raw sums the live autoscaler reads
from Prometheus (router/autoscaling.py ``queries``) over ``window_s``: met/missed/shed counts, p90 TTFT
and TPOT of the requests that ended, waiting requests averaged over scrapes every --scrape-s, requests
ended per second, load downgrades and routed requests, cache bytes reserved and free (averaged over the
scrapes, serving replicas). It turns them into
Signals with the same ``signals_from`` and calls the same ``decide``, with ``ScalingConfig`` at the
documented defaults (docs/autoscaling.md) and max_replicas = the static fleet. A replica asked for starts
serving --startup-s later (it costs from the moment it is asked for); one removed takes no new requests,
finishes what it holds and stops. Replica-hours: the time each replica is held within the trace.

The trace (seeded): a day compressed into --span-s: arrivals/s = trough + (peak - trough) * (1 - cos(2 pi t
/ span)) / 2 (night at both ends, the daily peak mid-span), times --burst-factor during --bursts bursts of
--burst-s each, at seeded times in the middle 80% of the span; Poisson arrivals of bench/simulate.py's three
request classes (chat, long-context, batch) by thinning. Prints one JSON line; --plot draws the replicas
and the attainment over time per variant.

    OMP_NUM_THREADS=1 .venv/bin/python bench/autoscale_sim.py --plot docs/img/autoscale-sim.png
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from policies.autoscaling import ScalingConfig, ScalingState, decide, signals_from  # noqa: E402
from policies.routing import RoutingRequest, WorkerState, build_policy  # noqa: E402
from policies.routing.arrivals import ArrivalMeter  # noqa: E402
from policies.routing.predict import Predictor  # noqa: E402
from simcore import SimReplica, SimRequest  # noqa: E402
from simulate import CLASSES, predictor_for, speed_label  # noqa: E402

VARIANTS = {"static": "fixed:all-attention", "scale-only": "fixed:all-attention", "degrade-first": "sla"}
_ARRIVAL, _STEP, _TICK = 0, 1, 2  # event kinds, in the order they run at one instant


@dataclass(frozen=True)
class Trace:
    span_s: float = 3600.0
    trough: float = 0.5  # arrivals/s at night
    peak: float = 3.5  # arrivals/s at the daily peak, without bursts
    bursts: int = 4
    burst_s: float = 120.0
    burst_factor: float = 1.6
    seed: int = 0
    classes: tuple | None = None  # request classes as bench/simulate.py's CLASSES (None: those)

    def burst_starts(self) -> list[float]:
        rng = random.Random(f"bursts-{self.seed}")
        return sorted(rng.uniform(0.1 * self.span_s, 0.9 * self.span_s - self.burst_s) for _ in range(self.bursts))

    def rate(self, t: float, starts: list[float] | None = None) -> float:
        starts = self.burst_starts() if starts is None else starts
        base = self.trough + (self.peak - self.trough) * (1 - math.cos(2 * math.pi * t / self.span_s)) / 2
        return base * (self.burst_factor if any(s <= t < s + self.burst_s for s in starts) else 1.0)

    def peak_rate(self) -> float:
        starts = self.burst_starts()
        return max(self.rate(t, starts) for t in np.linspace(0, self.span_s, 4001).tolist() + [s for s in starts])

    def requests(self) -> list[SimRequest]:
        """Poisson arrivals at rate(t), by thinning a process at the peak rate."""
        rng, starts, top, now, out = random.Random(self.seed), self.burst_starts(), self.peak_rate(), 0.0, []
        while True:
            now += rng.expovariate(top)
            if now >= self.span_s:
                return out
            if rng.random() * top > self.rate(now, starts):
                continue
            classes = self.classes or CLASSES
            kind, _, (lo, hi), max_tokens, ttft, tpot, deadline, priority = rng.choices(classes,
                                                                                        [c[1] for c in classes])[0]
            out.append(SimRequest(now, rng.randrange(lo, hi), max_tokens, ttft, tpot, deadline, priority, kind))


@dataclass
class Held:
    """A replica the fleet holds: asked for at ``asked``, serving from ``ready``, draining from ``drain``."""

    sim: SimReplica
    asked: float
    ready: float
    drain: float | None = None
    stopped: float | None = None

    def serving(self, now: float) -> bool:
        return self.drain is None and self.ready <= now

    def idle(self) -> bool:
        return not self.sim.running and not self.sim.waiting


def run(variant: str, predictor: Predictor, trace: Trace, config: ScalingConfig, *, window_s: float = 60.0,
        interval_s: float = 10.0, scrape_s: float = 5.0, startup_s: float = 120.0, static_replicas: int = 1,
        budget: int = 25 * 2**30, chunk: int = 2048, stats_period: float = 0.5, margin: float = 0.9,
        reuse_steps: int = 8, bucket_s: float = 60.0) -> dict:
    """One variant over the trace: attainment, quality, replica-hours, scale events and a timeline."""
    autoscale = variant != "static"
    policy = build_policy(VARIANTS[variant], predictor, margin=margin)
    best = max(p.quality for p in predictor.presets)
    index = {p.name: i for i, p in enumerate(predictor.presets)}
    requests = trace.requests()
    first = config.min_replicas if autoscale else static_replicas
    fleet = [Held(SimReplica(f"r{i}", budget, predictor, reuse_steps=reuse_steps), 0.0, 0.0) for i in range(first)]
    target, state = first, ScalingState()
    events = [(r.arrival, _ARRIVAL, i) for i, r in enumerate(requests)]
    events += [(k * scrape_s, _TICK, k) for k in range(1, int(trace.span_s / scrape_s) + 1)]
    heapq.heapify(events)
    ended: deque = deque()  # (time, kind, value): ("end", (met, ttft, tpot)), ("shed", None), ("routed", load?)
    scrapes: deque = deque()  # (time, waiting requests, cache bytes reserved, free): what Prometheus scraped
    snapshots, refreshed, dispatched = {}, -math.inf, {}
    idle = WorkerState("idle", cache_budget_bytes=budget)
    decisions, timeline, next_decision = [], [], interval_s

    def serving(now):
        return [h for h in fleet if h.serving(now)]

    def stop_drained(now):
        for h in fleet:
            if h.drain is not None and h.stopped is None and h.idle() and not h.sim.busy:
                h.stopped = max(now, h.drain)

    def kick(now):
        for i, h in enumerate(fleet):
            if h.stopped is None and h.ready <= now and not h.sim.busy:
                h.sim.admit()
                if h.sim.running:
                    h.sim.busy = True
                    heapq.heappush(events, (now + h.sim.step(now, chunk), _STEP, i))

    def raw_signals(now) -> dict[str, float]:
        while ended and ended[0][0] < now - window_s:
            ended.popleft()
        while scrapes and scrapes[0][0] < now - window_s:
            scrapes.popleft()
        ends = [v for _, kind, v in ended if kind == "end"]
        routed = [v for _, kind, v in ended if kind == "routed"]
        raw = {"met": float(sum(m for m, _, _ in ends)), "missed": float(sum(not m for m, _, _ in ends)),
               "shed": float(sum(kind == "shed" for _, kind, _ in ended)),
               "arrivals": len(ends) / window_s, "load_downgrades": float(sum(routed)), "routed": float(len(routed))}
        if ends:
            raw["ttft"] = float(np.percentile([t for _, t, _ in ends], 90))
            tpots = [t for _, _, t in ends if t is not None]
            if tpots:
                raw["tpot"] = float(np.percentile(tpots, 90))
        if scrapes:
            raw["waiting"] = float(np.mean([w for _, w, _, _ in scrapes]))
            raw["cache_used"] = float(np.mean([u for _, _, u, _ in scrapes]))
            raw["cache_free"] = float(np.mean([f for _, _, _, f in scrapes]))
        return raw

    def scale(now, wanted):
        live = [h for h in fleet if h.drain is None]
        for _ in range(wanted - len(live)):
            fleet.append(Held(SimReplica(f"r{len(fleet)}", budget, predictor, reuse_steps=reuse_steps,
                                         arrivals=ArrivalMeter(started_at=now)), now,
                              now + startup_s))
        for _ in range(len(live) - wanted):  # a starting replica first (newest), else the least loaded
            live = [h for h in fleet if h.drain is None]
            starting = [h for h in live if h.ready > now]
            gone = starting[-1] if starting else min(live, key=lambda h: len(h.sim.running) + len(h.sim.waiting))
            gone.drain = now
            if gone.ready > now:
                gone.ready = gone.stopped = now
        stop_drained(now)

    while events:
        now, kind, item = heapq.heappop(events)
        if kind == _ARRIVAL:
            if now - refreshed >= stats_period:
                snapshots, refreshed, dispatched = {h.sim.name: h.sim.snapshot(now) for h in serving(now)}, now, {}
            request = requests[item]
            live = serving(now)
            states = []
            for h in live:
                s = snapshots.get(h.sim.name) or h.sim.snapshot(now)  # started since the last refresh
                states.append(replace(s, in_flight=dispatched[s.replica_id]) if dispatched.get(s.replica_id) else s)
            routing = RoutingRequest(request.prompt, request.max_tokens, request.ttft_ms, request.tpot_ms,
                                     request.deadline_ms, priority=request.priority)
            decision = policy.decide(routing, states)
            if decision.shed:
                request.shed = True
                ended.append((now, "shed", None))
                continue
            request.preset = index[decision.preset]
            request.prediction = decision.raw_prediction
            request.cache_bytes = int(predictor.sequence_bytes(request.prompt + request.max_tokens)[request.preset])
            load = False  # router/routing.py downgrade(): faster than the best, and idle replicas would give the best
            if decision.prediction is not None and decision.prediction.quality < best:
                alone = policy.decide(routing, [idle])
                load = not alone.sla_at_risk and alone.prediction is not None and alone.prediction.quality >= best
            ended.append((now, "routed", load))
            name = decision.replica_id or live[0].sim.name
            replica = next(h for h in live if h.sim.name == name)
            dispatched[name] = dispatched.get(name, 0) + 1
            replica.sim.arrivals.record(now, request.prompt)  # what the worker counts (the router's future load)
            replica.sim.waiting.append(request)
        elif kind == _STEP:
            h = fleet[item]
            h.sim.busy = False
            for r in h.sim.finished_since():
                tpot = 1000 * (r.finished - r.first_token) / max(r.generated - 1, 1)
                if hasattr(policy, "observe") and r.prediction is not None:
                    policy.observe(r.prediction, 1000 * (r.first_token - r.arrival), tpot)
                ended.append((now, "end", (r.met(), r.first_token - r.arrival, tpot / 1000 if r.generated > 1 else None)))
            stop_drained(now)
        else:
            live = [h for h in fleet if h.stopped is None]
            up = serving(now)  # a replica reports its cache once it serves
            scrapes.append((now, sum(len(h.sim.waiting) for h in live), sum(h.sim.used for h in up),
                            sum(h.sim.budget - h.sim.used for h in up)))
            if autoscale and now >= next_decision - 1e-9:
                next_decision += interval_s
                running = len(serving(now))
                signals = signals_from(raw_signals(now), target, running, now, window_s)
                wanted, state, reason = decide(signals, state, config)
                if wanted != target:
                    decisions.append({"t": round(now, 1), "from": target, "to": wanted, "reason": reason,
                                      "signals": {k: round(v, 4) for k, v in asdict(signals).items()
                                                  if isinstance(v, float) and k != "now_s"}})
                    target = wanted
                    scale(now, wanted)
            if now % bucket_s < scrape_s / 2 or now + scrape_s > trace.span_s:
                timeline.append((now, target, len(serving(now))))
        kick(now)

    span = trace.span_s
    held_s = sum(min(h.stopped if h.stopped is not None else span, span) - min(h.asked, span) for h in fleet)
    served = [r for r in requests if not r.shed]
    buckets = {}
    for r in requests:
        b = int(r.arrival // bucket_s)
        met, total = buckets.get(b, (0, 0))
        buckets[b] = (met + r.met(), total + 1)
    return {"attainment": sum(r.met() for r in requests) / len(requests),
            "mean_quality": sum(predictor.presets[r.preset].quality for r in served) / max(len(served), 1),
            "replica_hours": held_s / 3600, "shed_rate": 1 - len(served) / len(requests),
            "scale_events": len(decisions), "max_replicas": max(t for _, t, _ in timeline) if timeline else first,
            "requests": len(requests), "decisions": decisions,
            "timeline": {"t": [t for t, _, _ in timeline], "target": [n for _, n, _ in timeline],
                         "serving": [n for _, _, n in timeline],
                         "attainment": [round(buckets.get(int(t // bucket_s) - 1, (0, 1))[0] /
                                              max(buckets.get(int(t // bucket_s) - 1, (0, 1))[1], 1), 3)
                                        for t, _, _ in timeline]}}


def _run_one(job: tuple) -> dict:  # in a worker process: the predictor is rebuilt there, not pickled
    variant, speed, trace, config, kwargs = job
    return run(variant, predictor_for(speed), trace, config, **kwargs)


def compare(speed: Path | None, trace: Trace, replica_rate: float, startup_s: float = 120.0,
            variants: tuple[str, ...] = tuple(VARIANTS), jobs: int = 1, overrides: dict | None = None,
            **kwargs) -> dict:
    """The variants on one trace (``jobs`` processes; the same result either way); the static fleet's size
    comes from the trace's peak, and is the autoscalers' max_replicas."""
    static = max(1, math.ceil(trace.peak_rate() / replica_rate - 1e-9))
    config = ScalingConfig(**{"min_replicas": 1, "max_replicas": static, **(overrides or {})})
    kwargs = {**kwargs, "startup_s": startup_s, "static_replicas": static}
    work = [(v, speed, trace, config, kwargs) for v in variants]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(work))) as pool:
            results = dict(zip(variants, pool.map(_run_one, work)))
    else:
        results = {job[0]: _run_one(job) for job in work}
    return {"static_replicas": static, "static_replica_hours": static * trace.span_s / 3600, "config": config,
            "results": results}


def summary(out: dict, trace: Trace, args) -> dict:
    static_h = out["static_replica_hours"]
    line = {"bench": "autoscale_sim", "speed": speed_label(args.speed), "trace": {k: v for k, v in asdict(trace).items() if k != "classes"},
            "peak_rate": round(trace.peak_rate(), 3), "startup_s": args.startup_s,
            "static_replicas": out["static_replicas"], "static_replica_hours": round(static_h, 3)}
    for name, r in out["results"].items():
        line[name] = {"attainment": round(r["attainment"], 4), "mean_quality": round(r["mean_quality"], 4),
                      "replica_hours": round(r["replica_hours"], 3), "static_replica_hours": round(static_h, 3),
                      "vs_static": round(r["replica_hours"] / static_h, 3), "scale_events": r["scale_events"],
                      "max_replicas": r["max_replicas"], "shed_rate": round(r["shed_rate"], 4)}
    d, s = out["results"].get("degrade-first"), out["results"].get("scale-only")
    if d and s:
        line["goal_met"] = bool(d["attainment"] >= 0.95 and d["replica_hours"] <= 0.6 * static_h
                                and d["replica_hours"] < s["replica_hours"] and d["attainment"] >= s["attainment"] - 0.005)
    return line


def plot(results: dict, trace: Trace, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5.5))
    top, bottom = figure.subplots(2, 1, sharex=True)
    starts = trace.burst_starts()
    grid = np.linspace(0, trace.span_s, 721)
    rate_axis = top.twinx()
    rate_axis.plot(grid / 60, [trace.rate(t, starts) for t in grid], color="0.8", lw=1)
    rate_axis.set_ylabel("arrivals / s (grey)")
    for name, r in results.items():
        t = np.array(r["timeline"]["t"]) / 60
        top.step(t, r["timeline"]["serving"], where="post", label=f"{name} (serving)")
        bottom.plot(t, r["timeline"]["attainment"], marker=".", lw=1, label=name)
    top.set_ylabel("replicas serving")
    top.legend(fontsize=7, loc="upper left")
    bottom.axhline(0.95, color="0.6", ls="--", lw=1)
    bottom.set_ylabel("attainment (per minute)")
    bottom.set_xlabel("minutes into the compressed day")
    bottom.set_ylim(0, 1.02)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))


def _setting(text: str) -> tuple[str, float]:
    key, _, value = text.partition("=")
    return key, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=Path, help="speed table (default: the 15B H100 roofline model)")
    parser.add_argument("--span-s", type=float, default=Trace.span_s)
    parser.add_argument("--trough", type=float, default=Trace.trough)
    parser.add_argument("--peak", type=float, default=Trace.peak)
    parser.add_argument("--bursts", type=int, default=Trace.bursts)
    parser.add_argument("--burst-s", type=float, default=Trace.burst_s)
    parser.add_argument("--burst-factor", type=float, default=Trace.burst_factor)
    parser.add_argument("--replica-rate", type=float, default=0.9,
                        help="arrivals/s one all-attention replica serves within budgets (sizes the static fleet)")
    parser.add_argument("--startup-s", type=float, default=120.0, help="a new replica serves this long after it is asked for")
    parser.add_argument("--budget-gib", type=float, default=25.0, help="cache memory per replica")
    parser.add_argument("--stats-period", type=float, default=0.5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], type=_setting, metavar="KEY=VALUE",
                        help="a ScalingConfig value other than its default (docs/autoscaling.md), e.g. upscale_cooldown_s=180")
    parser.add_argument("--jobs", type=int, default=1, help="variants run in this many processes")
    parser.add_argument("--out", type=Path, default=Path("bench/results/autoscale-sim-timeline.json"))
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    trace = Trace(args.span_s, args.trough, args.peak, args.bursts, args.burst_s, args.burst_factor, args.seed)
    out = compare(args.speed, trace, args.replica_rate, args.startup_s, tuple(args.variants.split(",")),
                  args.jobs, dict(args.set), budget=int(args.budget_gib * 2**30), stats_period=args.stats_period)
    line = summary(out, trace, args)
    line["config"] = {k: v for k, v in asdict(out["config"]).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": line, **{k: v for k, v in out["results"].items()}}, indent=None) + "\n")
    if args.plot:
        plot(out["results"], trace, args.plot)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
