"""Alert sinks: webhook delivery against a real local HTTP server, Alertmanager payloads,
log records, and fault isolation."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from monitors import AlertConfig, GateState, LogSink, SinkGroup, Transition, Verdict, WebhookSink
from monitors.alerts import ALERT_NAME, build_sinks


class _Server(ThreadingHTTPServer):
    """Records JSON bodies; answers with queued status codes, then ``default_code``.

    Clearing ``release`` holds every response (up to ``HOLD_S``) until it is set again: a
    test can then tell "returned before any answer" from "waited for one" without timing."""

    daemon_threads = True
    HOLD_S = 30.0

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.bodies: list[Any] = []
        self.codes: list[int] = []
        self.default_code = 200
        self.release = threading.Event()
        self.release.set()
        self.answered = 0  # responses about to be sent (counted before they leave)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/alerts"


class _Hook(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(json.loads(body))
        self.server.release.wait(self.server.HOLD_S)
        self.server.answered += 1
        code = self.server.codes.pop(0) if self.server.codes else self.server.default_code
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def transition(to: GateState, monitors: tuple[str, ...] = ("auc",), seq: int = 1, manual: bool = False) -> Transition:
    frm = GateState.OPEN if to is GateState.FROZEN else GateState.FROZEN
    return Transition(seq, frm, to, "auc: ctr AUC 0.50 < floor 0.55", 40_000, monitors, manual, "hold", 1_700_000_000.0)


def webhook(url: str, **overrides: Any) -> WebhookSink:
    fast = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 2.0}
    return WebhookSink(AlertConfig(webhook_urls=(url,), **{**fast, **overrides}))


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_webhook_posts_the_transition_as_json(hook: _Server) -> None:
    sink = webhook(hook.url)
    t = transition(GateState.FROZEN)
    sink.on_transition(t)
    assert sink.close(5.0)
    assert hook.bodies == [{"instance": "streamtrain", "transition": t.to_dict()}]
    assert (sink.delivered, sink.failed, sink.dropped) == (1, 0, 0)


def test_webhook_retries_after_server_errors(hook: _Server) -> None:
    hook.codes = [500, 503]
    sink = webhook(hook.url, max_retries=3)
    sink.on_transition(transition(GateState.FROZEN))
    assert sink.close(5.0)
    assert len(hook.bodies) == 3 and hook.bodies[0] == hook.bodies[2]
    assert (sink.delivered, sink.failed) == (1, 0)


def test_webhook_gives_up_after_max_retries_without_blocking_the_caller(hook: _Server) -> None:
    hook.default_code = 500
    hook.release.clear()  # no answer until the caller has returned
    sink = webhook(hook.url, max_retries=2, timeout_s=2 * hook.HOLD_S)  # a blocking caller would get the answer
    sink.on_transition(transition(GateState.FROZEN))
    assert hook.answered == 0  # the training thread only enqueued: it returned before any answer
    hook.release.set()
    assert sink.close(10.0)
    assert len(hook.bodies) == 3 and (sink.delivered, sink.failed) == (0, 1)


def test_webhook_does_not_retry_a_rejected_request(hook: _Server) -> None:
    hook.codes = [400]
    sink = webhook(hook.url, max_retries=3)
    sink.on_transition(transition(GateState.FROZEN))
    assert sink.close(5.0)
    assert len(hook.bodies) == 1 and sink.failed == 1


def test_webhook_survives_an_unreachable_endpoint(refused_port: int) -> None:
    sink = webhook(f"http://127.0.0.1:{refused_port}/", max_retries=2)
    sink.on_transition(transition(GateState.FROZEN))
    assert sink.close(5.0)
    assert (sink.delivered, sink.failed) == (0, 1)


def test_full_queue_drops_instead_of_waiting_and_close_is_bounded(hook: _Server) -> None:
    hook.default_code = 500
    hook.release.clear()  # every attempt hangs until the client's 2 s timeout: the backlog takes > 20 s
    sink = webhook(hook.url, queue_size=1, max_retries=5)
    for seq in range(4):  # the worker holds at most one, the queue one more
        sink.on_transition(transition(GateState.FROZEN, seq=seq))
    assert sink.dropped >= 2
    started = time.perf_counter()
    assert sink.close(0.2) is False  # gave up on the backlog instead of hanging shutdown
    assert time.perf_counter() - started < 5.0


def test_alertmanager_payload_fires_one_alert_per_monitor_and_resolves_them(hook: _Server) -> None:
    sink = webhook(hook.url, alertmanager=True, instance="trainer-a", severity="page")
    sink.on_transition(transition(GateState.FROZEN, monitors=("auc", "label_ratio")))
    sink.on_transition(transition(GateState.OPEN, monitors=("auc", "label_ratio"), seq=2))
    assert sink.close(5.0)
    firing, resolved = hook.bodies
    assert isinstance(firing, list) and [a["labels"]["monitor"] for a in firing] == ["auc", "label_ratio"]
    for alert in firing:
        assert set(alert) == {"labels", "annotations", "startsAt"}
        assert alert["labels"] == {
            "alertname": ALERT_NAME, "severity": "page", "instance": "trainer-a", "monitor": alert["labels"]["monitor"],
        }
        assert set(alert["annotations"]) == {"summary", "description"}
        assert "AUC 0.50" in alert["annotations"]["description"]
        assert alert["startsAt"] == "2023-11-14T22:13:20.000Z"
        datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
    assert [a["labels"] for a in resolved] == [a["labels"] for a in firing]
    assert all(a["endsAt"] == "2023-11-14T22:13:20.000Z" and a["startsAt"] for a in resolved)


def test_alertmanager_manual_freeze_and_firing_alerts_are_resent(hook: _Server) -> None:
    sink = webhook(hook.url, alertmanager=True, repeat_interval_s=0.05)
    sink.on_transition(transition(GateState.FROZEN, monitors=(), manual=True))
    wait_for(lambda: len(hook.bodies) >= 3)
    assert all(body == hook.bodies[0] for body in hook.bodies)
    assert hook.bodies[0][0]["labels"]["monitor"] == "manual"
    sink.on_transition(transition(GateState.OPEN, monitors=(), seq=2))
    wait_for(lambda: "endsAt" in hook.bodies[-1][0])
    sent = len(hook.bodies)
    time.sleep(0.2)
    assert len(hook.bodies) == sent  # nothing firing: nothing re-sent
    assert sink.close(5.0)


def a_verdict(ok: bool = True, alarm: bool = False) -> Verdict:
    return Verdict("auc", 3, 20_000, True, ok, alarm, False, {"auc/ctr": 0.74, "logloss/ctr": 0.3}, "" if ok else "bad")


def test_log_sink_logs_transitions_and_bad_windows_with_structured_extra(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink()
    with caplog.at_level(logging.DEBUG, logger="monitors.gate"):
        sink.on_transition(transition(GateState.FROZEN))
        sink.on_verdict(a_verdict(ok=False))
        sink.on_verdict(a_verdict())
    freeze, bad, ok = caplog.records
    assert freeze.levelno == logging.WARNING and "OPEN -> FROZEN" in freeze.getMessage()
    assert freeze.transition["reason"] == "auc: ctr AUC 0.50 < floor 0.55"  # type: ignore[attr-defined]
    assert bad.levelno == logging.WARNING and bad.verdict["ok"] is False  # type: ignore[attr-defined]
    assert ok.levelno == logging.DEBUG


class _Broken:
    def on_verdict(self, verdict: Verdict) -> None:
        raise RuntimeError("boom")

    def on_transition(self, transition: Transition) -> None:
        raise RuntimeError("boom")

    def close(self, timeout: float) -> bool:
        raise RuntimeError("boom")


class _Recorder:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def on_verdict(self, verdict: Verdict) -> None:
        self.calls.append("verdict")

    def on_transition(self, transition: Transition) -> None:
        self.calls.append("transition")

    def close(self, timeout: float) -> bool:
        return True


def test_sink_group_isolates_a_failing_sink(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    recorder = _Recorder(calls)
    group = SinkGroup([_Broken(), recorder])
    group.on_transition(transition(GateState.FROZEN))
    group.on_verdict(a_verdict())
    assert calls == ["transition", "verdict"]
    assert group.close(1.0) is False
    assert caplog.text.count("alert sink _Broken failed") == 3


def test_build_sinks_follows_the_config(hook: _Server) -> None:
    assert build_sinks(AlertConfig()) == []
    sinks = build_sinks(AlertConfig(webhook_urls=(hook.url,)))
    assert [type(s) for s in sinks] == [WebhookSink]
    assert SinkGroup(sinks).close(5.0)
