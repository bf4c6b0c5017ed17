"""A header-size limit for the REST server.

uvicorn's httptools parser (the fast one the sidecar uses) has no limit on the size of a
request's URL and headers: an 8 MB header is buffered and handed to the app. This protocol
counts them as they are parsed and answers 431 with a JSON error once they pass
`server.max_header_bytes`, before the request reaches the app.
"""

from __future__ import annotations

from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadersTooLarge(Exception):
    """Raised inside a parser callback: httptools stops parsing and uvicorn answers instead."""


def bounded_httptools_protocol(max_header_bytes: int) -> type[HttpToolsProtocol]:
    """An httptools protocol class that refuses requests whose request line and headers exceed
    `max_header_bytes` (431, then the connection is closed)."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # Any: forwarded as is to uvicorn's HttpToolsProtocol
            super().__init__(*args, **kwargs)
            self._header_bytes = 0
            self._too_large = False

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > max_header_bytes:
                self._too_large = True
                raise _HeadersTooLarge

        def on_message_begin(self) -> None:
            self._header_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def data_received(self, data: bytes) -> None:
            if self._too_large:
                return  # answered and closing: ignore the rest of that request
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            body = orjson.dumps({"error": f"request line and headers are over the limit of {max_header_bytes} "
                                          "bytes (server.max_header_bytes)"})
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: application/json\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\n"
                                 b"connection: close\r\n\r\n" + body)
            self.transport.close()

    return BoundedHttpToolsProtocol
