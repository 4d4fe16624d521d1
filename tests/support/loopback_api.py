"""What the emulated cloud APIs share: an HTTP server on 127.0.0.1 that
records every call and can be told to fail chosen ones.

`tests/support/hetzner_api.py` (Hetzner Cloud) and
`tests/support/tailscale_api.py` (Tailscale, over Headscale) subclass
`LoopbackAPI` and answer `handle(request)`; each writes its own cloud's error
body in `failure(...)`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the API's prefix and without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    raw: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, answer: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(answer).encode(), headers=headers or {})


@dataclass(frozen=True)
class Call:
    method: str
    path: str  # without the API's prefix and without the query
    query: dict[str, list[str]]
    body: Any  # the JSON sent, the text when it was not JSON, None when empty
    status: int


@dataclass
class _Failure:
    method: str
    path: re.Pattern[str]
    status: int
    times: int


def _recorded(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode(errors="replace")


class LoopbackAPI:
    """An emulated API, served on 127.0.0.1 while `running()`. Calls are
    answered one at a time (under `_lock`), as state changes must be."""

    prefix = ""  # the API's path prefix, e.g. /v1

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    def failure(self, status: int, request: Request) -> Reply:
        """The answer of an injected failure, in the cloud's own error shape."""
        raise NotImplementedError

    @contextmanager
    def running(self) -> Iterator[Self]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api._serve(self)

            def do_POST(self) -> None:
                api._serve(self)

            def do_PUT(self) -> None:
                api._serve(self)

            def do_PATCH(self) -> None:
                api._serve(self)

            def do_DELETE(self) -> None:
                api._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the tests read `calls`

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()
            self._server = None

    @property
    def origin(self) -> str:
        """http://127.0.0.1:<port>, without the prefix."""
        if self._server is None:
            raise RuntimeError(f"the emulated API {type(self).__name__} is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, method: str, path: str, status: int = 503, times: int = 1) -> None:
        """The next `times` calls of `method` on a path matching the regular
        expression `path` (without the prefix) answer `status`, in the
        cloud's own error shape."""
        with self._lock:
            self._failures.append(_Failure(method, re.compile(path), status, times))

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and re.fullmatch(pattern, c.path)]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        path = url.path.removeprefix(self.prefix) if url.path.startswith(self.prefix + "/") else url.path
        length = int(handler.headers.get("Content-Length") or 0)
        request = Request(
            method=handler.command,
            path=path,
            query=parse_qs(url.query),
            headers={k.lower(): v for k, v in handler.headers.items()},
            raw=handler.rfile.read(length) if length else b"",
        )
        with self._lock:
            reply = self._injected_failure(request) or self.handle(request)
            self.calls.append(Call(request.method, path, request.query, _recorded(request.raw), reply.status))
        # 204 answers have no body.
        data = b"" if reply.status == 204 else reply.body
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _injected_failure(self, request: Request) -> Reply | None:
        for failure in self._failures:
            if failure.times > 0 and failure.method == request.method and failure.path.fullmatch(request.path):
                failure.times -= 1
                return self.failure(failure.status, request)
        return None
