"""Errors the gateway raises, each carrying the transport status it maps to (REST / gRPC)."""

from __future__ import annotations


class GatewayError(Exception):
    """Base: one clear line; `http_status` for REST, `grpc_code` (name) for gRPC."""

    http_status = 500
    grpc_code = "INTERNAL"
    user_facing = True


class ModelError(GatewayError):
    """A model file or its config is missing, corrupt or incompatible."""

    http_status = 500


class ModelNotFound(GatewayError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class InvalidInput(GatewayError):
    """A request's inputs do not match the model (names, dtype, shape, ranges)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.reason = reason


class Overloaded(GatewayError):
    """Queues are full: the caller should retry after `retry_after_s`."""

    http_status = 503
    grpc_code = "UNAVAILABLE"

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


class Unauthorized(GatewayError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Forbidden(GatewayError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
