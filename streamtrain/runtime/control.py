"""The HTTP control endpoint: ``GET /healthz``, ``GET /status``, ``POST /freeze``, ``POST /unfreeze``.

Binds to loopback unless configured otherwise (DESIGN §6.5). Mutations need
``Authorization: Bearer <token>``; reads do not (status holds no secrets). Handlers run on
the server's threads: the callbacks given here must be thread-safe (the daemon's callbacks
only enqueue a command that the training loop applies at the next batch boundary).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


def ensure_token(configured: str | None, token_file: Path) -> str:
    """The configured token, or a fresh random one written to ``token_file`` (mode 0600)."""
    token = configured or secrets.token_urlsafe(32)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class ControlServer:
    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        status: Callable[[], dict[str, Any]],
        freeze: Callable[[str], dict[str, Any]],
        unfreeze: Callable[[str], dict[str, Any]],
        unavailable: tuple[type[Exception], ...] = (),
    ) -> None:
        self._token = token
        self._unavailable = unavailable  # route errors that mean "not now" (503), not a failure (500)
        self._routes_get = {"/healthz": lambda: {"ok": True}, "/status": status}
        self._routes_post = {"/freeze": freeze, "/unfreeze": unfreeze}
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "ControlServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="control-http", daemon=True)
        self._thread.start()
        log.info("control endpoint on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def authorised(self, header: str | None) -> bool:
        """Does an ``Authorization`` header carry this server's bearer token?"""
        scheme, _, presented = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._token.encode())

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        routes_get, routes_post, authorised, unavailable = self._routes_get, self._routes_post, self.authorised, self._unavailable

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to logging
                log.debug("control %s " + fmt, self.client_address[0], *args)

            def _reply(self, code: int, doc: Any) -> None:
                body = orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, route: Callable[[], Any]) -> None:
                """Run a route; a failure is a 500 with the error, never a dropped connection."""
                try:
                    doc = route()
                except unavailable as exc:
                    self._reply(503, {"error": str(exc)})
                    return
                except Exception as exc:  # noqa: BLE001 - the endpoint must answer whatever broke
                    log.exception("control endpoint %s failed", self.path)
                    self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
                    return
                self._reply(200, doc)

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                route = routes_get.get(self.path.split("?")[0])
                if route is None:
                    self._reply(404, {"error": f"no such endpoint {self.path}"})
                    return
                self._answer(route)

            def do_POST(self) -> None:  # noqa: N802
                route = routes_post.get(self.path.split("?")[0])
                if route is None:
                    self._reply(404, {"error": f"no such endpoint {self.path}"})
                    return
                if not authorised(self.headers.get("Authorization")):
                    self._reply(401, {"error": "missing or wrong bearer token"})
                    return
                raw_length = self.headers.get("Content-Length") or "0"
                if not raw_length.isdigit():
                    self._reply(400, {"error": f"Content-Length must be a non-negative integer, got {raw_length[:40]!r}"})
                    return
                length = int(raw_length)
                if length > MAX_BODY_BYTES:
                    self._reply(413, {"error": "body too large"})
                    return
                try:
                    body = orjson.loads(self.rfile.read(length)) if length else {}
                except orjson.JSONDecodeError:
                    self._reply(400, {"error": "body must be JSON like {\"reason\": \"...\"}"})
                    return
                reason = str(body.get("reason", "manual")) if isinstance(body, dict) else "manual"
                self._answer(lambda: route(reason))

        return Handler
