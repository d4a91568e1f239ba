"""Webhook sink: gate transitions POSTed as JSON from a background thread.

The training thread only serialises the payload and puts it on a bounded queue
(``put_nowait``: when the queue is full the alert is dropped and counted, never waited
for). The worker POSTs to every configured URL with bounded retries and exponential
backoff; 5xx, 429 and network errors are retried, other 4xx are not (the request itself is wrong).

Payloads:

* plain: ``{"instance": ..., "transition": Transition.to_dict()}``;
* ``alertmanager=True``: an Alertmanager v2 ``POST /api/v2/alerts`` body, a list of
  ``{"labels": {alertname, severity, instance, monitor}, "annotations": {summary,
  description}, "startsAt", ["endsAt"]}``, one alert per monitor that froze the gate
  (``monitor="manual"`` for an operator freeze). Reopening sends the same alerts with
  ``endsAt`` (resolved). Firing alerts are re-sent every ``repeat_interval_s``, because
  Alertmanager resolves an alert it has not heard of for ``resolve_timeout``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

from ..config import AlertConfig
from ..gate import GateState, Transition
from ..verdict import Verdict

logger = logging.getLogger("monitors.alerts")

ALERT_NAME = "StreamtrainGateFrozen"
_STOP = object()


def post_json(url: str, body: bytes, timeout_s: float) -> int:
    """POST ``body`` as application/json with the stdlib; return the HTTP status.
    Raises ``OSError`` (``URLError``, timeouts) when no response came back."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def rfc3339(timestamp: float) -> str:
    """Unix seconds -> ``2024-05-01T03:00:00.000Z``."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class WebhookSink:
    def __init__(self, config: AlertConfig) -> None:
        if not config.webhook_urls:
            raise ValueError("WebhookSink needs at least one url in AlertConfig.webhook_urls")
        self.config = config
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._firing: dict[str, dict[str, Any]] = {}  # monitor label -> firing alert (Alertmanager mode)
        self._lock = threading.Lock()  # guards _firing between the caller and the worker
        self._closing = threading.Event()
        self._abort = threading.Event()  # close() timed out: stop retrying now
        self.delivered = 0  # payload x url deliveries that got a 2xx
        self.failed = 0  # payload x url deliveries given up after retries
        self.dropped = 0  # payloads never queued (queue full or sink closed)
        self._thread = threading.Thread(target=self._run, name="monitors-webhook", daemon=True)
        self._thread.start()

    def on_verdict(self, verdict: Verdict) -> None:
        """Windows are not alerts: only gate transitions leave through a webhook."""

    def on_transition(self, transition: Transition) -> None:
        if self.config.alertmanager:
            alerts = self._update_firing(transition)
            if alerts:
                self._enqueue(alerts)
        else:
            self._enqueue({"instance": self.config.instance, "transition": transition.to_dict()})

    def close(self, timeout: float) -> bool:
        """Deliver what is queued within ``timeout`` s; then abandon the rest. True if all was attempted."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abort.set()
            return False
        return True

    def _enqueue(self, payload: Any) -> None:
        if self._closing.is_set():
            self.dropped += 1
            logger.warning("webhook sink closed: alert dropped")
            return
        try:
            self._queue.put_nowait(json.dumps(payload).encode())
        except queue.Full:
            self.dropped += 1
            logger.warning("webhook queue full (%d): alert dropped", self.config.queue_size)

    def _update_firing(self, transition: Transition) -> list[dict[str, Any]]:
        """Alertmanager alerts for this transition: the firing set, or the alerts it resolves."""
        stamp = rfc3339(transition.wall_time)
        with self._lock:
            if transition.to_state is GateState.OPEN:
                resolved = [{**alert, "endsAt": stamp} for alert in self._firing.values()]
                self._firing.clear()
                return resolved
            for monitor in transition.monitors or ("manual",):
                self._firing.setdefault(monitor, self._alert(monitor, transition, stamp))
            return list(self._firing.values())

    def _alert(self, monitor: str, transition: Transition, stamp: str) -> dict[str, Any]:
        return {
            "labels": {
                "alertname": ALERT_NAME,
                "severity": self.config.severity,
                "instance": self.config.instance,
                "monitor": monitor,
            },
            "annotations": {
                "summary": f"streamtrain publication gate frozen ({monitor})",
                "description": f"{transition.reason} [sample {transition.sample_count}, action {transition.action}]",
            },
            "startsAt": stamp,
        }

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.config.repeat_interval_s)
            except queue.Empty:
                with self._lock:
                    firing = list(self._firing.values())
                item = json.dumps(firing).encode() if firing else None
            if item is _STOP:
                return
            if item is not None:
                for url in self.config.webhook_urls:
                    self._deliver(url, item)

    def _deliver(self, url: str, body: bytes) -> None:
        cfg = self.config
        delay = cfg.backoff_initial_s
        for attempt in range(cfg.max_retries + 1):
            try:
                status = post_json(url, body, cfg.timeout_s)
            except OSError as exc:
                detail = str(exc)
            else:
                detail = f"HTTP {status}"
                if 200 <= status < 300:
                    self.delivered += 1
                    return
                if status < 500 and status != 429:
                    break  # the request is wrong; repeating it will not help
            if attempt == cfg.max_retries or self._abort.wait(delay):
                break
            delay = min(delay * 2, cfg.backoff_max_s)
        self.failed += 1
        logger.warning("webhook %s: alert not delivered after %d attempt(s): %s", url, attempt + 1, detail)
