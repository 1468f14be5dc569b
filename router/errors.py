"""Every error a client can get, mapped once, at the HTTP boundary, to an OpenAI-style JSON body.

``{"error": {"message", "type", "param", "code"}}`` with the status of the
project's exception (policies.errors); Ray's exceptions are translated here
and nowhere else.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from policies.errors import SupernetError

SHED_REASON_HEADER = "x-supernet-shed-reason"


class ApiError(Exception):
    """An HTTP error raised inside the ingress: status, machine code, message, the field it concerns."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_exception(exc: BaseException) -> ApiError:
    """The most specific mapping wins; anything unknown is a 500 that says so."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SupernetError):
        return ApiError(exc.http_status, exc.code, exc.message)
    if isinstance(exc, BackPressureError):
        return ApiError(429, "overloaded", "the workers' queues are full: retry after a short wait", None,
                        {"Retry-After": "1", SHED_REASON_HEADER: "queue-full"})
    if isinstance(exc, DeploymentUnavailableError):
        return ApiError(503, "worker_unavailable", "no worker is ready to serve this request", None,
                        {"Retry-After": "5"})
    if isinstance(exc, RequestCancelledError):
        return ApiError(499, "cancelled", "the request was cancelled")
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the worker's exception
    if isinstance(cause, BaseException) and cause is not exc:
        return from_exception(cause)
    return ApiError(500, "internal_error", f"internal error: {type(exc).__name__}: {exc}")
