"""The client's errors: each carries `reason`, a name from banditgate.events.REASONS where the
gateway has one (so a caller handles a client-side and a gateway-side refusal alike)."""

from __future__ import annotations


class ClientError(Exception):
    """Something the client could not do; `reason` is a short stable code, str() one line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidRequest(ClientError):
    """The request (or outcome) breaks the contract; refused before anything was sent."""


class GatewayRejected(ClientError):
    """The gateway refused the request: dead-lettered (Kafka) or a 4xx/5xx answer (HTTP). `reason`
    is the gateway's (e.g. bad_input, unknown_route, reply_refused, model_unavailable)."""


class PredictionTimeout(ClientError):
    """No prediction arrived within the timeout (reason ``timeout``). The request may still be
    answered later (the gateway serves at least once); the prediction then goes unclaimed."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)
