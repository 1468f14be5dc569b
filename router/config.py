"""The application's one configuration: a YAML file, validated at load. Helm values map to it key for key.

``supernet-router serve --config FILE`` reads it; with no file the embedded
default serves the small CPU checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policies.errors import ConfigError

DEFAULT_HOME = Path(os.environ.get("SUPERNET_ROUTER_HOME", Path.home() / ".cache" / "supernet-router"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    checkpoint: str | None = Field(None, description="Checkpoint folder (HF layout). None: the embedded small "
                                                     "checkpoint, made on first run under SUPERNET_ROUTER_HOME.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where workers run the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and KV dtype; auto: float32 on CPU, bfloat16 on CUDA.")
    max_context_tokens: int | None = Field(None, gt=0, description="Prompt + max_tokens limit; None: the "
                                                                   "checkpoint's max_position_embeddings.")


class PresetSettings(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", description="Preset name, "
                      "as clients ask for it (also a model id in /v1/models).")
    placement: str = Field(..., description="Placement code, one letter per layer (A, S, G, K).")
    quality: float | None = Field(None, description="Predicted quality retention vs all-attention (0..1), "
                                                    "from the quality surrogate.")
    description: str = Field("", description="What the preset is for.")


class WorkerSettings(_Strict):
    num_replicas: int = Field(1, ge=1, description="Worker replicas (each holds the whole checkpoint).")
    num_cpus: float = Field(1, ge=0, description="CPUs per worker replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica runs at once.")
    max_queued_requests: int = Field(64, ge=0, description="Requests a replica queues beyond "
                                     "max_ongoing_requests before fast 429s.")
    cache_budget_bytes: int | None = Field(256 * 2**20, gt=0, description="Bytes all sequence caches may hold; "
                                           "None on CUDA: gpu_memory_fraction of free memory after weights.")
    gpu_memory_fraction: float = Field(0.8, gt=0, le=1, description="Share of free GPU memory for caches.")
    max_prefill_tokens: int = Field(256, ge=1, description="Prompt tokens per step; longer prompts are chunked.")
    max_running: int = Field(64, ge=1, description="Rows one step may run.")
    fault_injection: bool = Field(False, description="Let chaos tests make the next model steps fail "
                                  "(WorkerServer.inject_step_faults, through the deployment handle). Never in "
                                  "production.")
    check_invariants: bool = Field(False, description="Check the engine's bookkeeping after every step (tests, "
                                   "chaos runs: costs CPU per step).")


class IngressSettings(_Strict):
    num_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one ingress replica handles at once "
                                                             "(Ray Serve's default of 5 would queue streams).")
    max_body_bytes: int = Field(1 * 2**20, ge=1024, description="Largest request body accepted (413 beyond).")
    max_tokens_default: int = Field(128, ge=1, description="max_tokens when a request gives none.")
    api_keys_file: str | None = Field(None, description="File with one API key per line; keys enable auth.")
    api_keys_env: str = Field("SUPERNET_ROUTER_API_KEYS", description="Environment variable with "
                              "comma-separated API keys (a Kubernetes Secret in the chart).")
    log_prompts: bool = Field(False, description="Log prompt text (off: only ids, sizes and timings).")
    model_name: str | None = Field(None, description="Model id served at /v1/models; default: the folder name.")


class TablesSettings(_Strict):
    speed: str | None = Field(None, description="Speed table (supernet-router profile) measured for this checkpoint "
                                                "on the workers' device; without one, routing uses the default preset.")
    acceptance: str | None = Field(None, description="Acceptance table (supernet-router acceptance) of this "
                                                     "checkpoint's presets as drafts: with a speed table, requests "
                                                     "with speculation \"auto\" speculate where it is predicted to win.")


class RoutingSettings(_Strict):
    policy: str = Field("sla", description="sla | fixed:<preset> | round-robin | least-loaded (baselines).")
    margin: float = Field(0.9, gt=0, le=1, description="Predictions must fit within margin x budget.")
    future_load_quantile: float = Field(0.95, ge=0, lt=1, description="TPOT must meet its budget with this "
                                        "quantile of the requests arriving at the replica while it decodes (their "
                                        "prefills stretch every decode step); 0: only the load seen now.")
    protect_running: bool = Field(True, description="A new request gets no preset whose step would make a "
                                  "running request there miss its TPOT budget (the fastest, when every one would).")
    default_preset: str | None = Field(None, description="Preset without a speed table or budget-free baselines; "
                                                         "default: the best-quality preset.")
    stats_period_s: float = Field(0.1, gt=0, description="How often workers publish their load to the router "
                                  "(fresher stats route better: docs/routing.md; raise it for large fleets).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After on a shed request (429).")


class MetricsSettings(_Strict):
    enabled: bool = Field(True, description="Record the supernet_* metrics (docs/metrics.md) through Ray's metrics "
                                            "agent, scraped on each Ray node's metrics export port (8080 on KubeRay).")


class AutoscalingSettings(_Strict):
    """The worker autoscaler (docs/autoscaling.md): the decision in policies/autoscaling.py, run by Ray Serve."""

    enabled: bool = Field(False, description="Autoscale the worker replicas; off: worker.num_replicas, fixed. "
                                             "On: worker.num_replicas is the initial count.")
    min_replicas: int = Field(1, ge=1, description="Fewest worker replicas.")
    max_replicas: int = Field(1, ge=1, description="Most worker replicas (each one holds the whole checkpoint).")
    prometheus_url: str | None = Field(None, description="Prometheus base URL (http://host:9090) whose supernet_* "
                                       "series feed the decision; None: the replicas' own stats, pushed to Serve.")
    window_s: float = Field(60.0, gt=0, description="Signals are rates and quantiles over this window.")
    interval_s: float = Field(10.0, gt=0, description="How often signals are read and the decision is made.")
    sla_target: float = Field(0.95, gt=0, le=1, description="Share of latency budget checks that must be met.")
    ttft_target_s: float | None = Field(None, gt=0, description="p90 time to first token to keep under "
                                                                "(None: not a signal).")
    tpot_target_s: float | None = Field(None, gt=0, description="p90 time per output token to keep under "
                                                                "(None: not a signal).")
    queue_wait_target_s: float | None = Field(1.0, gt=0, description="Mean wait in the workers' queues to keep "
                                                                     "under (None: not a signal).")
    quality_debt_budget: float = Field(0.2, ge=0, lt=1, description="Share of requests that may be served a "
                                       "faster preset because of load before it counts as quality debt.")
    debt_grace_s: float = Field(120.0, ge=0, description="Quality debt is absorbed by faster presets this long "
                                                         "before a replica is added.")
    utilisation_low: float = Field(0.5, gt=0, le=1, description="A replica goes only if the others would stay "
                                                                "under this cache occupancy (reserved / budget).")
    calm_fraction: float = Field(0.5, gt=0, lt=1, description="Hysteresis: scaling down needs every signal under "
                                                              "this share of its scale-up threshold.")
    upscale_cooldown_s: float = Field(30.0, ge=0, description="Seconds after any change before the next scale-up.")
    downscale_stable_s: float = Field(300.0, ge=0, description="Seconds of calm (and since any scale-up) before one "
                                                               "replica is removed.")
    downscale_step_s: float = Field(60.0, ge=0, description="After a removal, seconds of calm before the next one "
                                                             "(at least window_s: signals without the replica).")
    max_scale_up_factor: float = Field(2.0, ge=1, description="One scale-up multiplies the replicas by at most this.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.downscale_step_s < self.window_s:
            raise ValueError(f"downscale_step_s ({self.downscale_step_s}) is below window_s ({self.window_s}): the next "
                             "removal would be decided on signals that still include the replica just removed; "
                             "raise downscale_step_s to at least window_s")
        return self


class AppConfig(_Strict):
    model: ModelSettings = Field(default_factory=ModelSettings)
    presets: list[PresetSettings] = Field(default_factory=list, description="Placements served by name.")
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    tables: TablesSettings = Field(default_factory=TablesSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)

    @model_validator(mode="after")
    def _presets_consistent(self) -> "AppConfig":
        names = [p.name for p in self.presets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"preset names must be unique, repeated: {', '.join(duplicates)}")
        if self.routing.default_preset is not None and self.routing.default_preset not in names:
            raise ValueError(f"routing.default_preset {self.routing.default_preset!r} is not one of the presets "
                             f"({', '.join(names) or 'none configured'})")
        policy = self.routing.policy
        if policy.startswith("fixed:") and policy.split(":", 1)[1] not in names:
            raise ValueError(f"routing.policy {policy!r} names no configured preset ({', '.join(names)})")
        if policy not in ("sla", "round-robin", "least-loaded") and not policy.startswith("fixed:"):
            raise ValueError(f"routing.policy {policy!r} is unknown: use sla, fixed:<preset>, round-robin or "
                             "least-loaded")
        scaling = self.autoscaling
        if scaling.enabled and not scaling.min_replicas <= self.worker.num_replicas <= scaling.max_replicas:
            raise ValueError(f"worker.num_replicas ({self.worker.num_replicas}) is the initial count of an "
                             f"autoscaled worker: it must lie in [autoscaling.min_replicas, max_replicas] = "
                             f"[{scaling.min_replicas}, {scaling.max_replicas}]")
        if self.tables.speed is not None:
            unrated = [p.name for p in self.presets if p.quality is None]
            if unrated:
                raise ValueError(f"presets {', '.join(unrated)} have no quality: routing by budget needs each "
                                 "preset's predicted quality (presets.json from `supernet-router frontier`)")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AppConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "AppConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(f"{source}: {where}: {first['msg']}") from None


def resolve_checkpoint(config: AppConfig) -> Path:
    """The checkpoint folder to serve (``router.defaults`` fills it in for the embedded default)."""
    if config.model.checkpoint is None:
        raise ConfigError("model.checkpoint is not set: give the checkpoint folder to serve")
    return Path(config.model.checkpoint)
