"""The live SLA benchmark's pure parts: the request mix, its seeds and budgets, and the score of a run.

No service, no load tool, no clock: ``bench/live_sla.py`` drives the service and feeds the records here;
``tests/unit/test_live_trace.py`` checks them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestClass:
    """One kind of request: its share of the arrivals, its size, and its budget as multiples of the quality
    (all-attention) preset's own latency for this class on an idle service (the calibration)."""

    name: str
    share: float
    prompt_tokens: int
    output_tokens: int
    ttft_x: float
    tpot_x: float


# Short chat and long-context requests: attention's decode and cache grow with context, the other mixers'
# do not, so under load the long ones are where a cheaper placement keeps the budget.
MIX = (
    RequestClass("chat", 0.6, prompt_tokens=128, output_tokens=64, ttft_x=8.0, tpot_x=2.0),
    RequestClass("long-context", 0.4, prompt_tokens=3000, output_tokens=32, ttft_x=3.0, tpot_x=2.0),
)


def parse_mix(text: str | None) -> tuple[RequestClass, ...]:
    """A mix given on a command line: a JSON list of RequestClass fields; None or empty: ``MIX``.
    Raises ValueError saying what is wrong."""
    if not text:
        return MIX
    try:
        classes = tuple(RequestClass(**c) for c in json.loads(text))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"--mix must be a JSON list of {{name, share, prompt_tokens, output_tokens, ttft_x, "
                         f"tpot_x}} ({error})") from None
    if not classes or len({c.name for c in classes}) != len(classes) or min(c.share for c in classes) <= 0:
        raise ValueError("--mix needs at least one class, distinct names and positive shares")
    return classes


def class_rates(total_rate: float, mix=MIX) -> dict[str, float]:
    """Each class's Poisson rate: its share of the total (the superposition is Poisson at the total rate)."""
    total_share = sum(c.share for c in mix)
    return {c.name: total_rate * c.share / total_share for c in mix}


def class_requests(total_rate: float, seconds: float, mix=MIX) -> dict[str, int]:
    """Requests each class sends in a step of ``seconds``: at least one, so every class is measured."""
    return {name: max(1, round(rate * seconds)) for name, rate in class_rates(total_rate, mix).items()}


def class_seed(seed: int, total_rate: float, class_index: int) -> int:
    """The load tool's seed for one class at one rate: the same for every policy, so each policy sees the
    same arrivals and prompts; different across rates and classes, so the steps are independent draws."""
    return (seed * 1_000_003 + round(total_rate * 1000) * 101 + class_index) % (2**31 - 1)


def budgets(idle: dict[str, tuple[float, float]], mix=MIX) -> dict[str, dict[str, float]]:
    """``{class: {ttft_ms, tpot_ms}}`` from ``{class: (idle TTFT ms, idle TPOT ms)}`` of the quality preset."""
    return {c.name: {"ttft_ms": round(c.ttft_x * idle[c.name][0], 1), "tpot_ms": round(c.tpot_x * idle[c.name][1], 2)}
            for c in mix}


@dataclass(frozen=True)
class Record:
    """One request as the load tool saw it: ``ok`` False for an error (a 429 shed among them) or a request cut
    off by the tool; TPOT is the time per output token after the first (the service's definition)."""

    klass: str
    ok: bool
    ttft_ms: float | None
    tpot_ms: float | None
    ttft_budget_ms: float | None
    tpot_budget_ms: float | None
    error: str | None = None


def meets(record: Record) -> bool:
    """A request counts only if it was served and met every budget it carried."""
    if not record.ok or record.ttft_ms is None:
        return False
    if record.ttft_budget_ms is not None and record.ttft_ms > record.ttft_budget_ms:
        return False
    if record.tpot_budget_ms is not None and (record.tpot_ms is None or record.tpot_ms > record.tpot_budget_ms):
        return False
    return True


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that was measured, never interpolated."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(records: list[Record], seconds: float) -> dict:
    """Attainment, goodput (requests/s meeting their budgets over the step's ``seconds``), latency percentiles
    of the served requests, and the count of each error."""
    served = [r for r in records if r.ok]
    met = sum(meets(r) for r in records)
    ttft = [r.ttft_ms for r in served if r.ttft_ms is not None]
    tpot = [r.tpot_ms for r in served if r.tpot_ms is not None]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1

    def rounded(value, digits=1):
        return None if value is None else round(value, digits)

    return {
        "requests": len(records), "served": len(served), "met": met,
        "attainment": round(met / len(records), 4) if records else None,
        "goodput_rps": round(met / seconds, 3) if seconds > 0 else None,
        "p50_ttft_ms": rounded(percentile(ttft, 50)), "p99_ttft_ms": rounded(percentile(ttft, 99)),
        "p50_tpot_ms": rounded(percentile(tpot, 50), 2), "p99_tpot_ms": rounded(percentile(tpot, 99), 2),
        "errors": dict(sorted(errors.items())),
    }


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sum_by(metrics_text: str, name: str, label: str, **where: str) -> dict[str, float]:
    """``name``'s samples in Prometheus text, summed by one label over the processes that report them, keeping
    those whose labels match ``where``."""
    sums: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or match["name"] != name:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if all(labels.get(k) == v for k, v in where.items()):
            key = labels.get(label, "none")
            sums[key] = sums.get(key, 0.0) + float(match["value"])
    return sums


def ok_by_preset(metrics_text: str) -> dict[str, float]:
    """Served requests by preset (``supernet_requests_total{outcome="ok"}``)."""
    return sum_by(metrics_text, "supernet_requests_total", "preset", outcome="ok")


def served_between(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Requests served by each preset between two scrapes (counters only grow)."""
    return {p: round(after[p] - before.get(p, 0.0)) for p in sorted(after) if after[p] - before.get(p, 0.0) > 0}


def mean_quality(served: dict[str, int], quality: dict[str, float]) -> float | None:
    """Mean predicted quality of the served requests, from each preset's quality in the tables; a placement
    that is no preset (``custom``) has none and is left out."""
    rated = {p: n for p, n in served.items() if p in quality}
    total = sum(rated.values())
    return round(sum(quality[p] * n for p, n in rated.items()) / total, 4) if total else None


def prediction_ratios(before: str, after: str) -> dict[str, float]:
    """Mean measured / predicted latency by kind (ttft, tpot) of the requests routed between two scrapes: how
    well the service's predictions matched what it delivered."""
    def delta(name):
        b, a = sum_by(before, name, "kind"), sum_by(after, name, "kind")
        return {k: a[k] - b.get(k, 0.0) for k in a}

    sums, counts = delta("supernet_prediction_ratio_sum"), delta("supernet_prediction_ratio_count")
    return {k: round(sums[k] / counts[k], 3) for k in sorted(counts) if counts[k] > 0 and k in sums}
