"""Every error a client can get, mapped once, at the HTTP boundary, to an OpenAI-style JSON body.

``{"error": {"message", "type", "param", "code"}}`` with the status and headers
of the project's exception (policies.errors); Ray's exceptions are translated
here and nowhere else.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from policies.errors import Cancelled, Overloaded, SupernetError, WorkerUnavailable


def as_supernet_error(exc: BaseException) -> SupernetError:
    """The most specific mapping wins; anything unknown is a 500 that says so."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, SupernetError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded("the workers' queues are full: retry after a short wait")
    if isinstance(exc, DeploymentUnavailableError):
        return WorkerUnavailable("no worker is ready to serve this request")
    if isinstance(exc, RequestCancelledError):
        return Cancelled("the request was cancelled")
    if replica_died(exc):
        return WorkerUnavailable("the worker replica serving this request stopped (its process died): retry; "
                                 "Serve is replacing it")
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the worker's exception
    if isinstance(cause, BaseException) and cause is not exc:
        return as_supernet_error(cause)
    return SupernetError(f"internal error: {type(exc).__name__}: {exc}")


def replica_died(exc: BaseException) -> bool:
    """The worker replica's process is gone (killed, crashed, node lost): not the request's fault."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError))


def error_body(error: SupernetError) -> dict:
    kind = "invalid_request_error" if error.http_status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def error_response(exc: BaseException) -> JSONResponse:
    error = as_supernet_error(exc)
    return JSONResponse(error_body(error), status_code=error.http_status, headers=error.headers)
