"""Errors the gateway raises, each carrying the transport status it maps to (REST / gRPC) and the
reason its metrics and dead letters name it by (`reason`, a class attribute found along the MRO,
so a subclass answers for its parent unless it says otherwise)."""

from __future__ import annotations


class GatewayError(Exception):
    """Base: one clear line; `http_status` for REST, `grpc_code` (name) for gRPC."""

    http_status = 500
    grpc_code = "INTERNAL"
    user_facing = True
    reason: str | None = None
    """The `reason` label of banditgate_request_errors_total; None: `error_reason`'s default."""


class ModelError(GatewayError):
    """A model file or its config is missing, corrupt or incompatible."""

    http_status = 500


class ModelNotFound(GatewayError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "model_unavailable"


class InvalidInput(GatewayError):
    """A request's inputs do not match the model (names, dtype, shape, ranges)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason: str = "bad_input"  # each one's own, set by __init__

    def __init__(self, message: str, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.reason = reason


class Overloaded(GatewayError):
    """Queues are full: the caller should retry after `retry_after_s`."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(Overloaded):
    """A server the gateway depends on (Kafka) does not answer: retry later."""

    reason = "unavailable"


class TooManyRequests(Overloaded):
    """More inference requests in flight than `server.max_in_flight_requests`: retry later."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class ModelUnavailable(Overloaded):
    """The model is not answering: a batch outlived `models.inference_timeout_s`, and its batches
    fail at once (503 / UNAVAILABLE with `Retry-After`) until a probe answers in time."""

    reason = "model_unavailable"


class InferenceFailed(GatewayError):
    """ONNX Runtime raised while running a batch."""

    http_status = 500
    grpc_code = "INTERNAL"
    reason = "inference_failed"


class Unauthorized(GatewayError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Forbidden(GatewayError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


FOREIGN_REASONS: dict[type[BaseException], str] = {TimeoutError: "timeout"}
"""Reasons of exceptions that are not ours and so carry no `reason` (asyncio.wait_for's
TimeoutError), looked up along their MRO like ours."""


def error_reason(error: BaseException, default: str = "bad_input") -> str:
    """The reason an error is counted under: its own `reason` (an instance's, as InvalidInput
    sets, else its class's along the MRO), else that of the nearest class in FOREIGN_REASONS,
    else `default`.

    >>> error_reason(TooManyRequests("busy")), error_reason(ModelUnavailable("down"))
    ('overloaded', 'model_unavailable')
    >>> error_reason(InvalidInput("no", "missing_field")), error_reason(Forbidden("no"))
    ('missing_field', 'bad_input')
    """
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    for klass in type(error).__mro__:
        found = FOREIGN_REASONS.get(klass)
        if found is not None:
            return found
    return default
