"""One exception tree for the whole project, mapped once at each boundary.

Every error carries a machine-readable ``code``, the HTTP status the ingress
answers with, the exit code the CLI uses, and (as class data, widened per
instance) the response headers it needs. ``param`` names the request field it
concerns. Arguments stay plain strings so the errors pickle across processes.
"""

from __future__ import annotations

SHED_REASON_HEADER = "x-supernet-shed-reason"


class SupernetError(Exception):
    code = "internal_error"
    http_status = 500
    exit_code = 1
    headers: dict[str, str] = {}

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if headers:
            self.headers = {**type(self).headers, **headers}

    def __reduce__(self):  # keep param and headers across actors (Exception pickles only args)
        return type(self), (self.message, self.param, self.__dict__.get("headers"))


class InvalidRequest(SupernetError):
    code = "invalid_request"
    http_status = 400
    exit_code = 2


class InvalidJson(InvalidRequest):
    code = "invalid_json"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"
    http_status = 415


class BodyTooLarge(InvalidRequest):
    code = "body_too_large"
    http_status = 413


class InvalidPlacement(InvalidRequest):
    code = "invalid_placement"


class ContextTooLong(InvalidRequest):
    code = "context_too_long"
    http_status = 413


class UnknownPreset(InvalidRequest):
    code = "unknown_preset"
    http_status = 404


class UnknownModel(InvalidRequest):
    code = "model_not_found"
    http_status = 404


class Unauthorized(SupernetError):
    code = "invalid_api_key"
    http_status = 401
    exit_code = 2
    headers = {"WWW-Authenticate": "Bearer"}


class BudgetUnmeetable(SupernetError):
    """No preset meets a sheddable request's budget: 429 with the reason and when to retry (instance headers)."""

    code = "shed"
    http_status = 429


class Overloaded(SupernetError):
    """The workers' queues are full (Serve's backpressure): 429, retry shortly."""

    code = "overloaded"
    http_status = 429
    headers = {"Retry-After": "1", SHED_REASON_HEADER: "queue-full"}


class WorkerUnavailable(SupernetError):
    code = "worker_unavailable"
    http_status = 503
    headers = {"Retry-After": "5"}


class ReplicaNotReached(WorkerUnavailable):
    """A call pinned to one worker replica reached another: that one is gone, or the caller's handle does not
    know it yet (it started a moment ago; Serve tells each handle about new replicas on its own time)."""


class MetricsUnavailable(SupernetError):
    code = "metrics_unavailable"
    http_status = 503


class Cancelled(SupernetError):
    code = "cancelled"
    http_status = 499


class ConfigError(SupernetError):
    code = "config_error"
    http_status = 500
    exit_code = 2


class CheckpointError(SupernetError):
    """A checkpoint that does not match its config or this code: missing or misshapen tensors, unknown keys."""

    code = "checkpoint_mismatch"
    http_status = 500
    exit_code = 3


class TableMismatch(SupernetError):
    code = "table_mismatch"
    http_status = 500
    exit_code = 3


class EngineFailure(SupernetError):
    code = "engine_failure"
    http_status = 500
    exit_code = 1
