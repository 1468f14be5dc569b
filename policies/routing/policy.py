"""Choose a preset and a replica for each request from its budget, the replicas' load and its context length.

SLA policy, in order:
1. candidates: presets with quality >= min_quality (a forced preset: only it);
2. predict queue wait, TTFT, TPOT and completion for every (preset, replica); TPOT counts the prefills of
   the requests that will arrive while it decodes, at a quantile of the replica's arrivals
   (``future_load_quantile``, ``kernels.add_future_load``);
3. keep pairs that meet every given budget with a safety margin and whose cache can ever fit;
4. among pairs admitted at once (no queue, cache fits now) whose step the replica's running rows can
   take and still meet their own TPOT budgets (``RunningRow.step_allowance_ms``, with the margin; rows
   already past saving are not counted), pick the highest predicted quality, ties going to the earliest
   completion; when every admitted pair would cost a running row its budget, the fastest admitted pair
   (least harm: ``protect_running``); when every replica queues, the earliest completion instead:
   admission is FIFO, so a request that queues blocks all behind it, and fast, small presets drain
   the queues (degrade before the budget is lost);
5. nothing meets the budget: shed a sheddable request (``no-preset-meets-slo``), else serve the
   fastest (earliest completion) pair and flag ``sla_at_risk``.
No budget: the best quality, on the replica where it completes first.

Speculation ("auto", with an acceptance table): before step 3, each preset's TPOT on each replica is
replaced by its speculated TPOT where some draft preset and draft length k win
(``policies.speculation``): the draft's step and the verify step priced from the same predictions,
the draft's prefill spread over the output, and only where the time this request saves exceeds what its
verify rows add to every other row of the batch. Quality is the target's, so a budget that only the
quality preset's speculated TPOT meets gets the quality preset, speculating.

Baselines for benchmarks: ``fixed:<preset>`` (that preset, replicas in turn), ``round-robin`` and
``least-loaded`` (both on the default, best-quality preset).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from policies.errors import ConfigError, InvalidRequest, UnknownPreset
from policies.routing.kernels import add_future_load, earliest_per_preset
from policies.routing.predict import Fleet, Forecast, Predictor, WorkerView
from policies.routing.types import Decision, Prediction, PresetInfo, RoutingRequest, WorkerState
from policies.speculation import MAX_DRAFT_TOKENS, AcceptanceRates, speculative_tpot

SHED_NO_PRESET = "no-preset-meets-slo"
_DRAFT_LENGTHS = np.arange(1, MAX_DRAFT_TOKENS + 1, dtype=float)
_EMPTY = WorkerState(replica_id="", cache_budget_bytes=2**62)


class _Base:
    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.presets = predictor.presets
        self.index = {p.name: i for i, p in enumerate(self.presets)}
        self._views: dict[str, WorkerView] = {}
        self._fleet: Fleet | None = None
        self._fleet_states: list[WorkerState] = []
        # Compile the per-request loops now (or load them from numba's cache), not on the first request.
        forecast = predictor.predict(RoutingRequest(1, 1), self.fleet([]))
        earliest_per_preset(forecast.times, forecast.flags, np.ones(len(self.presets), dtype=bool), 1.0, 1.0, 1.0,
                            1.0, 1.0, np.ones(1))

    def fleet(self, states: list[WorkerState]) -> Fleet:
        """Per-snapshot work is cached: a replica's view is rebuilt only when its state object changes,
        and the stacked arrays only when some view did."""
        states = list(states) or [_EMPTY]  # a copy: the caller may reuse its list
        if self._fleet is not None and self._fleet_states == states:  # identity first: one C loop, no __eq__
            return self._fleet
        views = []
        for state in states:
            view = self._views.get(state.replica_id)
            if view is None or view.state is not state:
                view = self.predictor.view(state)
                self._views[state.replica_id] = view
            views.append(view)
        self._fleet = Fleet.stack(tuple(views), self.predictor.onehot, self.predictor.chunk_fixed_ms,
                                  self.predictor.chunk)
        self._fleet_states = states
        return self._fleet

    def _decision(self, p: int, w: int, fleet: Fleet, forecast: Forecast, reason: str, **flags) -> Decision:
        preset = self.presets[p]
        prediction = Prediction(*forecast.pair(p, w), preset.quality)
        replica = fleet.views[w].state.replica_id or None
        return Decision(preset.name, preset.placement, replica, prediction, reason, **flags)

    def _given_draft(self, request: RoutingRequest, decision: Decision) -> Decision:
        """With speculation "given", the client's draft, as asked (the policy chooses only with "auto")."""
        if request.speculation == "given":
            decision.draft, decision.draft_tokens = request.draft, request.draft_tokens
            decision.draft_preset = next((p.name for p in self.presets if p.placement == request.draft), None)
        return decision

    def _forced(self, request: RoutingRequest) -> int | None:
        name = request.preset
        if request.placement is not None:
            name = next((p.name for p in self.presets if p.placement == request.placement), None)
            if name is None:
                return -1  # a placement that is no preset: served as is, without predictions
        if name is None:
            return None
        if name not in self.index:
            raise UnknownPreset(f"unknown preset {name!r}: use one of {', '.join(self.index)}")
        return self.index[name]


class SlaPolicy(_Base):
    def __init__(self, predictor: Predictor, margin: float = 0.9, acceptance: AcceptanceRates | None = None,
                 min_gain: float = 0.05, future_load_quantile: float = 0.95, protect_running: bool = True):
        super().__init__(predictor)
        self.protect_running = protect_running  # False: only the new request's own budget is checked
        if not 0 <= future_load_quantile < 1:
            raise ConfigError(f"routing future_load_quantile must be in [0, 1), got {future_load_quantile}")
        self.future_load_quantile = future_load_quantile  # 0: budgets checked against today's load only
        self.acceptance = acceptance if acceptance else None
        self.min_gain = min_gain  # speculate only for a predicted TPOT at least this much lower
        self._by_code = {p.placement.code: i for i, p in enumerate(self.presets)}
        self._drafts = [[] if self.acceptance is None else
                        [self._by_code[d] for d in self.acceptance.drafts_of(p.placement.code)
                         if d in self._by_code and d != p.placement.code] for p in self.presets]
        if not 0 < margin <= 1:
            raise ConfigError(f"routing safety margin must be in (0, 1], got {margin}")
        self.margin = margin
        self._all = np.ones(len(self.presets), dtype=bool)
        self._by_quality = np.argsort(-predictor.quality, kind="stable").tolist()
        groups: dict[float, list[int]] = {}
        for p in self._by_quality:
            groups.setdefault(float(predictor.quality[p]), []).append(p)
        self._equal_quality = [groups[q] for q in predictor.quality.tolist()]  # per preset: those of its quality
        self.error = {"ttft": 1.0, "tpot": 1.0}  # measured / predicted, from served requests (EWMA)
        self._plans: dict | None = None  # the current decision's speculation plans (``_speculate``)

    def observe(self, prediction: Prediction, ttft_ms: float, tpot_ms: float | None, weight: float = 0.05) -> None:
        """Online calibration from a finished request: a request's TTFT and TPOT also depend on the load that
        arrives after it was placed, which no snapshot shows; their measured/predicted ratios scale later
        predictions (bounded, so one outlier cannot swing them). ``prediction``: the decision's
        ``raw_prediction`` (uncalibrated)."""
        for key, measured, predicted in (("ttft", ttft_ms, prediction.ttft_ms), ("tpot", tpot_ms, prediction.tpot_ms)):
            if measured is not None and predicted > 0:
                ratio = min(max(measured / predicted, 0.5), 4.0)
                self.error[key] += weight * (ratio - self.error[key])

    def decide(self, request: RoutingRequest, states: list[WorkerState]) -> Decision:
        return self._given_draft(request, self._decide(request, states))

    def _decide(self, request: RoutingRequest, states: list[WorkerState]) -> Decision:
        forced = self._forced(request)
        fleet = self.fleet(states)
        self._plans = None
        if forced == -1:
            w = min(range(len(fleet.views)), key=lambda i: _load(fleet.views[i].state))
            return Decision(None, request.placement, fleet.views[w].state.replica_id or None, None,
                            "placement forced by the request")
        forecast = self.predictor.predict(request, fleet)
        plans = None
        if request.speculation == "auto" and self.acceptance is not None:
            forecast, plans = self._speculate(request, fleet, forecast)
        self._plans = plans
        if self.future_load_quantile > 0:  # forecast.times is this request's own: adjusted in place
            add_future_load(forecast.times, fleet.arrivals_per_ms, fleet.interference_ms, float(request.max_tokens),
                            self.future_load_quantile)
        inf = math.inf
        soonest, where = earliest_per_preset(
            forecast.times, forecast.flags, self._allowed(request, forced),
            inf if request.ttft_ms is None else float(self.margin * request.ttft_ms),  # floats: one compiled
            inf if request.tpot_ms is None else float(self.margin * request.tpot_ms),  # signature only
            inf if request.deadline_ms is None else float(self.margin * request.deadline_ms),
            float(self.error["ttft"]), float(self.error["tpot"]),
            self.margin * fleet.step_cap if self.protect_running else np.full(len(fleet.views), inf))
        admitted, meeting, usable, harmless = soonest.tolist()
        # Prefer pairs admitted at once: a request that queues for memory blocks every request behind it
        # (admission is FIFO), so a quality win for one can cost many their budgets. Among those, pairs whose
        # step the running rows can take: a heavy row admitted where the running rows' budgets are tight
        # slows all of them, and those budgets were promised first.
        p = self._best_quality(harmless)
        if p is not None:
            reason = ("preset forced by the request" if forced is not None else
                      "best quality that meets the budget" if request.has_budget else "no budget: best quality")
            return self._decision(p, where.item(3, p), fleet, forecast, reason)
        if forced is not None and admitted[forced] != inf:
            return self._decision(forced, where.item(0, forced), fleet, forecast, "preset forced by the request")
        if min(admitted) != inf:  # every admitted pair slows some running row past its budget: the least
            p = min(range(len(admitted)), key=admitted.__getitem__)
            return self._decision(p, where.item(0, p), fleet, forecast, "fastest preset that meets the budget: "
                                  "the running requests' budgets leave no room for a better one")
        if min(usable) == inf:
            raise InvalidRequest("the request's cache (prompt + max_tokens) fits no replica under any allowed "
                                 "preset: shorten it")
        p = min(range(len(meeting)), key=meeting.__getitem__)
        if meeting[p] != inf:  # every replica queues: the fastest pair that meets the budget drains the queues soonest
            return self._decision(p, where.item(1, p), fleet, forecast,
                                  "replicas are queueing: fastest preset that meets the budget")
        p = min(range(len(usable)), key=usable.__getitem__)
        w = where.item(2, p)
        if forced is not None:
            return self._decision(p, w, fleet, forecast, "preset forced by the request; budget at risk",
                                  sla_at_risk=True)
        if request.sheddable:
            return self._decision(p, w, fleet, forecast, SHED_NO_PRESET, shed=True, sla_at_risk=True)
        return self._decision(p, w, fleet, forecast, "no preset meets the budget: fastest", sla_at_risk=True)

    def _allowed(self, request: RoutingRequest, forced: int | None) -> np.ndarray:
        if forced is not None:
            allowed = np.zeros(len(self.presets), dtype=bool)
            allowed[forced] = True
            return allowed
        if request.min_quality is None:
            return self._all
        allowed = self.predictor.quality >= request.min_quality
        if not allowed.any():
            raise InvalidRequest(f"no preset reaches min_quality {request.min_quality} (the best predicts "
                                 f"{self.predictor.quality.max():.3f})")
        return allowed

    def _best_quality(self, soonest: list[float]) -> int | None:
        """The highest-quality preset with a pair (finite ``soonest``); among equal qualities, the earliest."""
        for p in self._by_quality:
            if soonest[p] != math.inf:
                return min((q for q in self._equal_quality[p] if soonest[q] != math.inf), key=soonest.__getitem__)
        return None

    def _decision(self, p: int, w: int, fleet: Fleet, forecast: Forecast, reason: str, **flags) -> Decision:
        """As reported to the client: calibrated like the budget check, so headers and choices agree."""
        preset = self.presets[p]
        queue_wait, ttft, tpot, completion = raw = forecast.pair(p, w)
        ttft_error, tpot_error = self.error["ttft"], self.error["tpot"]
        prediction = Prediction(queue_wait * ttft_error, ttft * ttft_error, tpot * tpot_error,
                                ttft * ttft_error + (completion - ttft) * tpot_error, preset.quality)
        decision = Decision(preset.name, preset.placement, fleet.views[w].state.replica_id or None, prediction,
                            reason, raw_prediction=Prediction(*raw, preset.quality), **flags)
        plan = None if self._plans is None else self._plans.get(p)
        if plan is not None and plan[1][w] > 0:
            drafts, tokens, plain = plan
            draft = self.presets[int(drafts[w])]
            decision.draft, decision.draft_tokens, decision.draft_preset = draft.placement, int(tokens[w]), draft.name
            decision.plain_tpot_ms = float(plain[w]) * tpot_error
        return decision

    def _speculate(self, request: RoutingRequest, fleet: Fleet, forecast: Forecast) -> tuple[Forecast, dict]:
        """The forecast with each preset's TPOT (and completion) at its best speculation where that wins, and
        per such preset the plan per replica: (draft preset index, k (0: plain), plain TPOT).

        A replica's rows of the target preset are assumed to speculate together (the router decides alike
        for them): a draft step replaces their target mixers by the draft's, read for all of them at once,
        which is what makes it cheap; a verify step adds their k extra tokens. Rows of other presets run
        as they do, in every step."""
        times, plans = forecast.times, {}
        tpot, calibration = times[2], fleet.calibration
        width = len(fleet.views)
        for p, drafts in enumerate(self._drafts):
            if not drafts:
                continue
            target = self.presets[p].placement
            plain = tpot[p].copy()
            best, best_draft, best_tokens = plain.copy(), np.zeros(width), np.zeros(width)
            for w, view in enumerate(fleet.views):
                same = [r.context_tokens for r in view.state.running if r.placement == target]
                rows = len(same) + 1
                context = (sum(same) + request.prompt_tokens + request.max_tokens / 2) / rows
                mixers = calibration[w] * self.predictor.mixers_ms(p, rows, context)
                verify = plain[w] + calibration[w] * rows * _DRAFT_LENGTHS * self.predictor.prefill_ms_per_token(
                    p, context)  # [K]
                for d in drafts:
                    rate = self.acceptance.rate(target.code, self.presets[d].placement.code, request.sampled)
                    draft_step = plain[w] - mixers + calibration[w] * self.predictor.mixers_ms(d, rows, context)
                    prefill = calibration[w] * request.prompt_tokens * self.predictor.prefill_ms_per_token(
                        d, request.prompt_tokens)  # the draft's own prefill, after the first token
                    speculated = speculative_tpot(rate, _DRAFT_LENGTHS, draft_step, verify, prefill,
                                                  request.max_tokens)
                    k = int(speculated.argmin())
                    if speculated[k] < (1 - self.min_gain) * plain[w] and speculated[k] < best[w]:
                        best[w], best_draft[w], best_tokens[w] = speculated[k], d, _DRAFT_LENGTHS[k]
            if best_tokens.any():
                if not plans:
                    times = times.copy()
                times[2, p] = best
                times[3, p] = times[1, p] + (request.max_tokens - 1) * best
                plans[p] = (best_draft, best_tokens, plain)
        return (Forecast(times, forecast.flags) if plans else forecast), plans


class Baseline(_Base):
    """A fixed preset on a replica chosen by round robin or least load (for benchmarks)."""

    def __init__(self, predictor: Predictor, preset: str, replicas: str):
        super().__init__(predictor)
        if preset not in self.index:
            raise ConfigError(f"baseline preset {preset!r} is not one of {', '.join(self.index)}")
        if replicas not in ("round-robin", "least-loaded"):
            raise ConfigError(f"unknown replica choice {replicas!r}")
        self.preset, self.replicas = self.index[preset], replicas
        self._turn = itertools.count()

    def decide(self, request: RoutingRequest, states: list[WorkerState]) -> Decision:
        fleet = self.fleet(states)
        forced = self._forced(request)
        p = self.preset if forced in (None, -1) else forced
        if self.replicas == "round-robin":
            w = next(self._turn) % len(fleet.views)
        else:
            w = min(range(len(fleet.views)), key=lambda i: _load(fleet.views[i].state))
        decision = self._decision(p, w, fleet, self.predictor.predict(request, fleet), f"baseline {self.replicas}")
        return self._given_draft(request, decision)


def _load(state: WorkerState) -> tuple:
    return (len(state.running) + state.waiting_requests + state.in_flight, state.cache_used_bytes)


def build_policy(name: str, predictor: Predictor, default_preset: str | None = None, margin: float = 0.9,
                 acceptance: AcceptanceRates | None = None, future_load_quantile: float = 0.95,
                 protect_running: bool = True):
    """``sla`` | ``fixed:<preset>`` | ``round-robin`` | ``least-loaded`` (the last two on the default preset)."""
    default = default_preset or max(predictor.presets, key=lambda p: p.quality).name
    if name == "sla":
        return SlaPolicy(predictor, margin, acceptance, future_load_quantile=future_load_quantile,
                         protect_running=protect_running)
    if name.startswith("fixed:"):
        return Baseline(predictor, name.split(":", 1)[1], "round-robin")
    if name in ("round-robin", "round_robin"):
        return Baseline(predictor, default, "round-robin")
    if name in ("least-loaded", "least_loaded"):
        return Baseline(predictor, default, "least-loaded")
    raise ConfigError(f"unknown routing policy {name!r}: use sla, fixed:<preset>, round-robin or least-loaded")


__all__ = ["Baseline", "PresetInfo", "SHED_NO_PRESET", "SlaPolicy", "build_policy"]
