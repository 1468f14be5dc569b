"""Live SLA benchmark: `supernet-router serve` (the default checkpoint) under GuideLLM's Poisson load.
Every routing policy runs the same seeded ladder of rates; per rate: the share of requests meeting all their
budgets, goodput, p50/p99 TTFT and TPOT, and the mean quality served.

    .venv/bin/python bench/live_sla.py --rates 0.25,0.5,1,2 --seconds 60 --plot docs/img/live-sla.png

The mix (`bench/live_trace.py`): 60% chat (128 prompt tokens, 64 out; budget 8x the TTFT and 2x the TPOT
that the quality (all-attention) preset has for it on the idle service), 40% long-context (3000 in, 32 out;
3x TTFT, 2x TPOT), streamed completions with `ignore_eos`; `--mix` gives another as JSON request classes
(`bench/live_trace.py` RequestClass fields), e.g. long outputs behind long prompts, where full attention's
decode is most of the work:

    .venv/bin/python bench/live_sla.py --replicas 1 --rates 0.3,0.4,0.5 --seconds 150 \
        --speed-table bench/results/speed-stdlib-supernet-8l-xeon.json \
        --mix '[{"name": "long-context", "share": 1, "prompt_tokens": 2000, "output_tokens": 512, "ttft_x": 3, "tpot_x": 2}]'

GuideLLM measures those idle latencies first, one
request at a time (`--budgets` fixes the budgets instead). GuideLLM sends one extra body per process, so each
class is its own GuideLLM process at its share of the rate, all started together, the class's `sla` in the
backend's `extras`. A shed (429), an error, a request GuideLLM cut off or one missing from its output
(`not-in-output`: GuideLLM 0.8.1 sometimes leaves a served request out) counts as missed. TPOT is GuideLLM's
inter-token latency, (latency - TTFT) / (tokens - 1), the service's definition. Served quality comes from the
service: `supernet_requests_total{outcome="ok"}` by preset at `GET /metrics`, scraped around each step and
weighted by each preset's quality in the tables.

Replicas: 2 worker replicas of 1 CPU each where the machine has 2 CPUs or more (the ingress reserves none),
else 1; GuideLLM and the ingress share those CPUs. The speed table is the one the service profiles on its
first run (under `~/.cache/supernet-router/speed/`; it takes it again while the kept one was profiled
beside other work, docs/tables.md), or pass `--speed-table`. GuideLLM (`make guidellm`: guidellm==0.8.1 in `.cache/guidellm-venv`)
runs offline on the checkpoint's own tokenizer files. One JSON line (the policies at the lowest rate where
fixed all-attention meets under half the budgets); the per-rate table goes to
`bench/results/live-sla-sweep.json`, every request to `.cache/live-sla/requests.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.live_trace import (MIX, Record, budgets, class_rates, class_requests, class_seed, parse_mix,  # noqa: E402
                              mean_quality, ok_by_preset, prediction_ratios, served_between, summarize)
from bench.procstat import free_port  # noqa: E402

WORK = ROOT / ".cache" / "live-sla"
GUIDELLM = ROOT / ".cache" / "guidellm-venv" / "bin" / "guidellm"
SWEEP = ROOT / "bench" / "results" / "live-sla-sweep.json"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GUIDELLM__MAX_WORKER_PROCESSES": "1"}  # one request process per class: the service needs the CPUs


def fail(message: str) -> None:
    sys.exit(f"live_sla.py: {message}")


# --- the service -------------------------------------------------------------------------------------------

def service_config(policy: str, replicas: int, speed_table: str | None) -> dict:
    """The default configuration (`supernet-router serve` with no --config), with this policy and replica count."""
    from router.config import AppConfig
    from router.defaults import default_checkpoint, default_config, default_presets

    if speed_table:  # a given table: the default otherwise, without profiling this machine first
        folder = default_checkpoint()
        config = AppConfig(model={"checkpoint": str(folder)}, presets=default_presets(folder / "presets.json"),
                           tables={"speed": speed_table, "acceptance": str(folder / "acceptance.json")})
    else:
        config = default_config()
    data = config.model_dump()
    data["routing"]["policy"] = policy
    data["worker"]["num_replicas"] = replicas
    return AppConfig.from_dict(data, source=f"live_sla {policy}").model_dump()


class Service:
    """`supernet-router serve --config FILE` in its own process group, its log kept for when it fails."""

    def __init__(self, config: dict, name: str):
        self.config, self.name = config, name
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = WORK / f"serve-{name}.log"

    def __enter__(self) -> "Service":
        path = WORK / f"config-{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config))
        command = [str(ROOT / ".venv" / "bin" / "supernet-router"), "serve", "--config", str(path),
                   "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}  # serve sets up the rest of local Ray
        self.log = open(self.log_path, "w")
        # SIGINT back to its default: a shell's background job inherits it ignored, and then Ctrl-C never
        # reaches serve's shutdown.
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self._wait_healthy(timeout_s=600)
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__()  # what it started may still run
                fail(f"the service ({self.name}) exited with {self.process.returncode} before it answered:\n"
                     + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.__exit__()
        fail(f"the service ({self.name}) did not answer /health within {timeout_s:.0f} s; log: {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # serve.shutdown and ray.shutdown run
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # what Ray left behind in the group
        except ProcessLookupError:
            pass
        self.log.close()

    def metrics(self, more_served: int = 0) -> str:
        """The service's /metrics once its served-request counters have settled (they reach the page a report
        interval late) and, with ``more_served``, grown by that many since the last call."""
        import httpx

        def served(text: str) -> float:
            return sum(ok_by_preset(text).values())

        floor = getattr(self, "_served", 0.0) + more_served
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        for _ in range(30):
            time.sleep(1.5)
            again = httpx.get(f"{self.url}/metrics", timeout=30).text
            if served(again) == served(text) and served(again) >= floor:
                break
            text = again
        self._served = served(again)
        return again


def prompt_of(tokens: int) -> str:
    return " ".join(["data"] * tokens)  # about one token a word with this tokenizer: only a warm-up


async def warm_up(service: Service, presets: list[str], replicas: int, model: str, mix=MIX) -> None:
    """Every preset and the routing path on every class's size, until every replica has answered (the
    health check passes with one)."""
    import httpx

    seen: set[str] = set()
    deadline = time.monotonic() + 300
    async with httpx.AsyncClient(base_url=service.url, timeout=300) as http:
        while True:
            bodies = [{"model": model, "prompt": prompt_of(c.prompt_tokens), "max_tokens": 8, "ignore_eos": True,
                       **extra} for c in mix for extra in [{"preset": p} for p in presets] + [{}]]
            responses = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies * replicas))
            bad = [r for r in responses if r.status_code != 200]
            if bad:
                fail(f"warm-up request failed with {bad[0].status_code}: {bad[0].text[:500]}")
            seen |= {r.headers.get("x-supernet-replica", "") for r in responses}
            if len(seen) >= replicas:
                return
            if time.monotonic() > deadline:
                fail(f"only {len(seen)} of {replicas} worker replicas answered in 300 s (log: {service.log_path})")
            await asyncio.sleep(5)


# --- GuideLLM ----------------------------------------------------------------------------------------------

def scenario(url: str, model: str, tokenizer: Path, klass, body: dict, profile: dict, count: int,
             max_seconds: float, seed: int, out: Path) -> dict:
    return {"spec": {
        "backend": {"kind": "openai_http", "target": url, "model": model, "request_format": "/v1/completions",
                    "stream": True, "timeout": 600, "extras": {"body": body}},
        "profile": profile,
        "constraints": [{"kind": "max_requests", "count": count}, {"kind": "max_duration", "seconds": max_seconds}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": klass.prompt_tokens,
                  "output_tokens": klass.output_tokens}],
        "seed": {"kind": "static", "value": seed},
        "outputs": [{"kind": "json", "path": str(out)}],
        "metrics": {"kind": "generative", "sample_size": 0},  # timings of every request, no texts
    }}


def run_guidellm(guidellm: Path, scenarios: dict[str, dict], timeout_s: float) -> dict[str, dict]:
    """Run one GuideLLM process per scenario, all at once; their benchmark (the output's first)."""
    processes = {}
    for name, spec in scenarios.items():
        path = WORK / f"scenario-{name}.json"
        path.write_text(json.dumps(spec, indent=1))
        log = open(WORK / f"guidellm-{name}.log", "w")
        processes[name] = (subprocess.Popen([str(guidellm), "run", "--scenario", str(path), "--disable-console"],
                                            cwd=WORK, env={**os.environ, **OFFLINE}, stdout=log,
                                            stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + timeout_s
    for process, log in processes.values():  # all of them ended before any result is judged
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    results = {}
    for name, (process, _) in processes.items():
        out = Path(scenarios[name]["spec"]["outputs"][0]["path"])
        if process.returncode != 0 or not out.exists():
            fail(f"GuideLLM ({name}) failed with exit code {process.returncode}:\n"
                 + (WORK / f"guidellm-{name}.log").read_text()[-3000:])
        results[name] = json.loads(out.read_text())["benchmarks"][0]
    return results


def error_kind(message: str | None) -> str:
    """A short name for a failed request: its HTTP status where GuideLLM's message has one."""
    match = re.search(r"'(\d{3}) [A-Za-z ]+'", message or "")
    return f"http-{match[1]}" if match else (message or "error").split(":")[0][:60]


def records_of(benchmark: dict, klass: str, budget: dict, sent: int | None = None) -> list[Record]:
    """GuideLLM's requests as records; ``sent`` requests expected: any GuideLLM left out of its output count as
    missed (``not-in-output``), never silently dropped."""
    requests = benchmark["requests"]
    out = []
    for status in ("successful", "errored", "incomplete"):
        for r in requests.get(status, []):
            ok = status == "successful"
            error = None if ok else ("cut-off" if status == "incomplete" else error_kind(r["info"].get("error")))
            out.append(Record(klass, ok, r.get("time_to_first_token_ms"),
                              r.get("inter_token_latency_ms") if r.get("output_tokens", 0) > 1 else None,
                              budget.get("ttft_ms"), budget.get("tpot_ms"), error))
    missing = max(0, (sent or 0) - len(out))
    return out + [Record(klass, False, None, None, budget.get("ttft_ms"), budget.get("tpot_ms"), "not-in-output")
                  for _ in range(missing)]


# --- the run -----------------------------------------------------------------------------------------------

def calibrate(service: Service, guidellm: Path, tokenizer: Path, model: str, requests: int, mix=MIX) -> dict:
    """Idle TTFT and TPOT of the quality preset per class: GuideLLM, one request at a time, first one dropped."""
    idle = {}
    for index, klass in enumerate(mix):
        spec = scenario(service.url, model, tokenizer, klass, {"preset": "quality"}, {"kind": "synchronous"},
                        requests + 1, 600, 1000 + index, WORK / f"calibrate-{klass.name}.json")
        served = [r for r in records_of(run_guidellm(guidellm, {klass.name: spec}, 900)[klass.name], klass.name, {})
                  if r.ok][1:]
        if not served:
            fail(f"calibration: no {klass.name} request was served (log: {service.log_path})")
        idle[klass.name] = (statistics.median(r.ttft_ms for r in served), statistics.median(r.tpot_ms for r in served))
    return idle


def run_step(service: Service, guidellm: Path, tokenizer: Path, model: str, rate: float, seconds: float,
             seed: int, class_budgets: dict, mix=MIX) -> tuple[list[Record], dict]:
    """One rate: every class's GuideLLM at once; the records, and the step's facts from the service (requests
    served by preset, its measured/predicted latency ratios) and from GuideLLM (its warnings, such as requests
    sent late because its own process was short of CPU)."""
    rates, counts = class_rates(rate, mix), class_requests(rate, seconds, mix)
    specs = {}
    for index, klass in enumerate(mix):
        body = {"sla": class_budgets[klass.name]}
        specs[klass.name] = scenario(service.url, model, tokenizer, klass, body,
                                     {"kind": "poisson", "rate": [rates[klass.name]]}, counts[klass.name],
                                     4 * seconds + 120, class_seed(seed, rate, index),
                                     WORK / f"out-{service.name}-{rate:g}-{klass.name}.json")
    before = service.metrics()
    results = run_guidellm(guidellm, specs, 6 * seconds + 600)
    records = [r for name, b in results.items() for r in records_of(b, name, class_budgets[name], counts[name])]
    after = service.metrics(more_served=sum(r.ok for r in records))
    warnings = [f"{name}: {w['message']}" for name, b in results.items() for w in b.get("warnings") or []]
    return records, {"served_by_preset": served_between(ok_by_preset(before), ok_by_preset(after)),
                     "measured_over_predicted": prediction_ratios(before, after), "tool_warnings": warnings}


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    attainment, quality = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        rates = [r["rate"] for r in mine]
        attainment.plot(rates, [r["attainment"] for r in mine], marker="o", label=policy)
        quality.plot(rates, [r["mean_quality"] for r in mine], marker="o", label=policy)
    attainment.set(xlabel="requests/s", ylabel="share meeting all budgets", ylim=(0, 1.05), title="SLA attainment")
    lowest = min([r["mean_quality"] for r in rows if r["mean_quality"] is not None] + [0.9])
    quality.set(xlabel="requests/s", ylabel="mean predicted quality served", title="Served quality",
                ylim=(lowest - 0.02, 1.01))  # a fixed preset's flat line stays a line, not the whole axis
    attainment.axhline(0.9, color="grey", linewidth=0.5, linestyle="--")
    attainment.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def goal(rows: list[dict]) -> dict:
    """At the lowest rate where fixed all-attention meets under half the budgets: the SLA policy's
    attainment and quality against the fastest preset's quality."""
    by = {(r["policy"], r["rate"]): r for r in rows}
    knee = next((r["rate"] for r in rows if r["policy"] == "fixed:quality" and (r["attainment"] or 0) < 0.5), None)
    if knee is None or ("sla", knee) not in by:
        return {"goal_rate": knee, "goal_met": None}
    sla, fastest = by[("sla", knee)], by.get(("fixed:fastest", knee))
    fastest_quality = fastest["mean_quality"] if fastest else None
    met = None if fastest_quality is None else (  # without the fastest preset's run it cannot be judged
        sla["attainment"] >= 0.9 and sla["mean_quality"] is not None and sla["mean_quality"] > fastest_quality)
    return {"goal_rate": knee, "fixed_quality_attainment": by[("fixed:quality", knee)]["attainment"],
            "sla_attainment": sla["attainment"], "sla_quality": sla["mean_quality"],
            "fastest_attainment": fastest and fastest["attainment"], "fastest_quality": fastest_quality,
            "goal_met": met}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.25,0.5,1,2", help="total requests/s, comma-separated "
                                                              "(default 0.25,0.5,1,2)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds of arrivals per rate (default 60)")
    parser.add_argument("--policies", help="comma-separated; default: sla, fixed:<each preset>, least-loaded")
    parser.add_argument("--replicas", type=int, help="worker replicas (default: 2 with 2+ CPUs, else 1)")
    parser.add_argument("--budgets", help='JSON {class: {"ttft_ms":..,"tpot_ms":..}}: skip the calibration')
    parser.add_argument("--calibration-requests", type=int, default=4, help="idle requests per class (default 4)")
    parser.add_argument("--speed-table", help="the service's speed table (default: the one it profiles here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidellm", type=Path, default=GUIDELLM, help=f"GuideLLM's command (default {GUIDELLM})")
    parser.add_argument("--plot", type=Path, help="write the attainment/quality plot here")
    parser.add_argument("--mix", help="JSON list of request classes (bench/live_trace.py RequestClass fields; "
                                      "default: its MIX)")
    args = parser.parse_args()
    try:
        mix = parse_mix(args.mix)
    except ValueError as error:
        fail(str(error))
    # Ctrl-C and SIGTERM end the run through the services' shutdown, even where a shell started this in the
    # background with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.guidellm.exists():
        fail(f"no GuideLLM at {args.guidellm}: `make guidellm` installs guidellm==0.8.1 in its own virtual "
             "environment there (or give --guidellm)")
    from router.defaults import default_checkpoint

    WORK.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    replicas = args.replicas or (2 if (os.cpu_count() or 1) >= 2 else 1)
    checkpoint = default_checkpoint()
    tokenizer = WORK / "tokenizer"  # the tokenizer files only: transformers does not know the model's config
    tokenizer.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, tokenizer / name)
    model = checkpoint.name
    first = service_config("sla", replicas, args.speed_table)
    quality = {p["name"]: p["quality"] for p in first["presets"]}
    policies = (args.policies.split(",") if args.policies
                else ["sla", *[f"fixed:{p}" for p in quality], "least-loaded"])
    class_budgets = json.loads(args.budgets) if args.budgets else None
    idle, rows, requests = None, [], []
    started = time.monotonic()
    for policy in policies:
        config = service_config(policy, replicas, args.speed_table)
        with Service(config, policy.replace(":", "-")) as service:
            asyncio.run(warm_up(service, list(quality), replicas, model, mix))
            if class_budgets is None:
                idle = calibrate(service, args.guidellm, tokenizer, model, args.calibration_requests, mix)
                class_budgets = budgets(idle, mix)
            for rate in rates:
                records, facts = run_step(service, args.guidellm, tokenizer, model, rate, args.seconds, args.seed,
                                          class_budgets, mix)
                row = {"policy": policy, "rate": rate, **summarize(records, args.seconds),
                       "mean_quality": mean_quality(facts["served_by_preset"], quality), **facts}
                rows.append(row)
                requests += [{"policy": policy, "rate": rate, **vars(r)} for r in records]
                print(json.dumps(row), file=sys.stderr)
    SWEEP.write_text(json.dumps(rows, indent=1) + "\n")
    (WORK / "requests.json").write_text(json.dumps(requests))
    speed = first["tables"]["speed"]
    if args.plot:
        plot(rows, args.plot, f"supernet-router serve, default checkpoint, {replicas} CPU replica(s); GuideLLM "
                              f"Poisson, {args.seconds:.0f} s per rate")
    import importlib.metadata as metadata

    print(json.dumps({
        "bench": "live_sla", "tool": f"guidellm {guidellm_version(args.guidellm)}",
        "replicas": replicas, "cpus": os.cpu_count(), "seconds_per_rate": args.seconds, "rates": rates,
        "policies": policies, "mix": {c.name: [c.share, c.prompt_tokens, c.output_tokens, c.ttft_x, c.tpot_x]
                                      for c in mix},
        "idle_quality_ms": idle and {k: [round(v[0], 1), round(v[1], 2)] for k, v in idle.items()},
        "budgets": class_budgets, "speed_table": speed if args.speed_table else "profiled on this machine",
        **goal(rows), "sweep": str(SWEEP.relative_to(ROOT)), "wall_s": round(time.monotonic() - started),
        "ray": metadata.version("ray"),
    }))


def guidellm_version(guidellm: Path) -> str:
    script = "import importlib.metadata as m; print(m.version('guidellm'))"
    result = subprocess.run([str(guidellm.parent / "python"), "-c", script], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
