"""One exception tree for the whole project, mapped once at each boundary.

Every error carries a machine-readable ``code``, the HTTP status the ingress
answers with and the exit code the CLI uses. Arguments stay plain strings so
the errors pickle across processes.
"""

from __future__ import annotations


class SupernetError(Exception):
    code = "internal_error"
    http_status = 500
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(SupernetError):
    code = "invalid_request"
    http_status = 400
    exit_code = 2


class InvalidPlacement(InvalidRequest):
    code = "invalid_placement"


class ContextTooLong(InvalidRequest):
    code = "context_too_long"
    http_status = 413


class UnknownPreset(InvalidRequest):
    code = "unknown_preset"
    http_status = 404


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
