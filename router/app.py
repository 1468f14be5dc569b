"""Build the Ray Serve application from one configuration: an ingress and a worker deployment."""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from router.autoscaling import serve_autoscaling_config
from router.config import AppConfig, resolve_checkpoint
from router.ingress import Ingress
from router.metrics import WorkerMetrics
from workers.deployment import WorkerServer, WorkerSpec
from workers.model.config import load_config


def build_app(config: AppConfig, listen: tuple[str, int] | None = None) -> Application:
    """``listen``: (host, port) where the ingress replicas serve HTTP themselves (``router/http_server.py``),
    off Serve's HTTP proxy; None: through Serve's proxy only (the Helm chart's RayService)."""
    checkpoint = str(resolve_checkpoint(config).resolve())
    model = load_config(checkpoint)
    for preset in config.presets:  # a bad preset fails here, before anything starts
        model.placement(preset.placement)
    worker = config.worker
    spec = worker_spec(config, checkpoint)
    scaling = config.autoscaling
    replicas = ({"autoscaling_config": serve_autoscaling_config(scaling, worker.num_replicas)} if scaling.enabled
                else {"num_replicas": worker.num_replicas})
    # The worker counts its requests itself (WorkerSpec.max_open_requests: Overloaded beyond): Serve's own
    # limit only bounds calls in flight, one long-lived subscription per ingress replica among them.
    worker_deployment = serve.deployment(WorkerServer, name="SupernetWorker").options(
        **replicas,
        ray_actor_options={"num_cpus": worker.num_cpus, "num_gpus": worker.num_gpus},
        max_ongoing_requests=spec.max_open_requests + config.ingress.num_replicas + 16,
        max_queued_requests=-1,
        health_check_period_s=10,
        request_router_config=RequestRouterConfig(
            request_router_class="router.replica_router:SupernetRequestRouter",
            request_router_kwargs={"deployment": "SupernetWorker"},
            request_routing_stats_period_s=config.routing.stats_period_s,
            request_routing_stats_timeout_s=max(1.0, config.routing.stats_period_s),
        ),
    )
    ingress = Ingress.options(num_replicas=config.ingress.num_replicas,
                              max_ongoing_requests=config.ingress.max_ongoing_requests)
    observer = WorkerMetrics({model.placement(p.placement).code: p.name for p in config.presets},
                             enabled=config.metrics.enabled, window_s=scaling.window_s)
    return ingress.bind(worker_deployment.bind(spec, observer=observer), config.model_dump(), checkpoint, listen)


def worker_spec(config: AppConfig, checkpoint: str) -> WorkerSpec:
    worker = config.worker
    return WorkerSpec(checkpoint=checkpoint, device=config.model.device, dtype=config.model.dtype,
                      num_threads=max(1, int(worker.num_cpus)), cache_budget_bytes=worker.cache_budget_bytes,
                      gpu_memory_fraction=worker.gpu_memory_fraction, max_prefill_tokens=worker.max_prefill_tokens,
                      max_running=worker.max_running, fault_injection=worker.fault_injection,
                      check_invariants=worker.check_invariants,
                      max_open_requests=worker.max_ongoing_requests + worker.max_queued_requests)


def app_builder(args: dict) -> Application:
    """Serve config entry point (``import_path: router.app:app_builder``): ``args`` is an AppConfig mapping.

    This is how the Helm chart's RayService starts the application; the same
    schema as ``supernet-router serve --config``.
    """
    return build_app(AppConfig.from_dict(args, source="serve config args"))
