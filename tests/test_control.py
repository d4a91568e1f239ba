"""Control endpoint: loopback, token-guarded mutations, JSON answers."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamtrain.runtime.control import ControlServer, ensure_token


def _call(url: str, method: str = "GET", token: str | None = None, body: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=body)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


@pytest.fixture
def server() -> Any:
    calls: list[tuple[str, str]] = []
    srv = ControlServer("127.0.0.1", 0, "s3cret", status=lambda: {"gate": "OPEN"},
                        freeze=lambda r: calls.append(("freeze", r)) or {"gate": "FROZEN"},
                        unfreeze=lambda r: calls.append(("unfreeze", r)) or {"gate": "OPEN"}).start()
    srv.calls = calls
    yield srv
    srv.stop()


def test_reads_are_open_and_bound_to_loopback(server: Any) -> None:
    assert server.address[0] == "127.0.0.1"
    assert _call(server.url + "/healthz") == (200, {"ok": True})
    assert _call(server.url + "/status") == (200, {"gate": "OPEN"})
    assert _call(server.url + "/nope")[0] == 404


def test_mutations_need_the_token(server: Any) -> None:
    assert _call(server.url + "/freeze", "POST")[0] == 401
    assert _call(server.url + "/freeze", "POST", token="wrong")[0] == 401
    assert server.calls == []
    status, doc = _call(server.url + "/freeze", "POST", token="s3cret", body=b'{"reason": "bad deploy"}')
    assert (status, doc) == (200, {"gate": "FROZEN"})
    assert _call(server.url + "/unfreeze", "POST", token="s3cret")[0] == 200
    assert server.calls == [("freeze", "bad deploy"), ("unfreeze", "manual")]
    assert _call(server.url + "/freeze", "POST", token="s3cret", body=b"{not json")[0] == 400


def test_generated_token_file_is_private(tmp_path: Path) -> None:
    token = ensure_token(None, tmp_path / "control.token")
    assert len(token) >= 32
    assert (tmp_path / "control.token").stat().st_mode & 0o077 == 0
    assert ensure_token("given", tmp_path / "t2") == "given"


def _raw_post(url: str, headers: dict[str, str], body: bytes = b"") -> int:
    """A POST with hand-made headers (urllib would compute Content-Length itself)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", "/freeze", skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders(body)
    status = conn.getresponse().status
    conn.close()
    return status


def test_malformed_content_length_gets_400_not_a_dropped_connection(server: Any) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    assert _raw_post(server.url, {**auth, "Content-Length": "abc"}) == 400
    assert _raw_post(server.url, {**auth, "Content-Length": "-5"}) == 400
    assert server.calls == []


def test_a_failing_route_answers_500_and_integer_keys_serialise() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    srv = ControlServer("127.0.0.1", 0, "t", status=lambda: {"lag": {0: 5, 1: 0}}, freeze=lambda r: broken(),
                        unfreeze=lambda r: {}).start()
    try:
        assert _call(srv.url + "/status") == (200, {"lag": {"0": 5, "1": 0}})
        status, doc = _call(srv.url + "/freeze", "POST", token="t")
        assert status == 500 and "boom" in doc["error"]
    finally:
        srv.stop()


def test_a_command_the_daemon_can_no_longer_apply_gets_503() -> None:
    class Gone(RuntimeError):
        pass

    def late(reason: str) -> dict[str, Any]:
        raise Gone("the daemon is shutting down: freeze was not applied")

    srv = ControlServer("127.0.0.1", 0, "t", status=lambda: {}, freeze=late, unfreeze=late, unavailable=(Gone,)).start()
    try:
        status, doc = _call(srv.url + "/freeze", "POST", token="t")
        assert status == 503 and "shutting down" in doc["error"]
    finally:
        srv.stop()
