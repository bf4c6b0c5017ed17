"""The worker's web port (`feedback.web_port`): Prometheus metrics and the health endpoints.

``GET /health/live`` and ``GET /health/ready`` answer 200 or 503 with a small JSON document
(``{"ready": false, "reason": "Redis does not answer", "partitions": [0, 1]}``) from the
`HealthBoard` (feedback/health.py); every other path is prometheus_client's metrics app, as before
(``/metrics``, and for compatibility any other path). A thread per request, none waits on the
worker's event loop.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, TypeAlias
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

from feedback.health import Answer, HealthBoard

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

WsgiApp: TypeAlias = "WSGIApplication"


def make_app(registry: CollectorRegistry, board: HealthBoard) -> WsgiApp:
    """The port's WSGI app: the two health paths, then the metrics app for everything else."""
    metrics = make_wsgi_app(registry)
    probes: dict[str, tuple[str, Callable[[], Answer]]] = {"/health/live": ("live", board.live),
                                                           "/health/ready": ("ready", board.ready)}

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics(environ, start_response)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        key, answer = probe
        result = answer()
        body = orjson.dumps(result.document(key))
        start_response("200 OK" if result.ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe in flight never holds the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would flood the log (an exception in the app is still printed by
        wsgiref's handler)."""


def start_web_server(host: str, port: int, registry: CollectorRegistry,
                     board: HealthBoard) -> tuple[WSGIServer, threading.Thread]:
    """Serve `make_app` on host:port (0: any free port; IPv6 hosts too) in a daemon thread.
    Raises OSError when the port cannot be bound."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("WebServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(str(address[0]), port, make_app(registry, board), server_class,
                                     handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="feedback-web", daemon=True)
    thread.start()
    return server, thread
