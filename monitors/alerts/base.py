"""The sink protocol and the fan-out that isolates the training thread from sink failures."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Protocol, TypeVar

from ..gate import Transition
from ..verdict import Verdict

logger = logging.getLogger("monitors.alerts")

_T = TypeVar("_T")


class Sink(Protocol):
    """Receives every window verdict and every gate transition.

    Both callbacks run on the thread that produced the event (training thread for
    verdicts and automatic transitions, control endpoint for manual ones). They must
    return quickly and must not mutate what they receive; slow work (HTTP) belongs on the
    sink's own thread.
    """

    def on_verdict(self, verdict: Verdict) -> None: ...

    def on_transition(self, transition: Transition) -> None: ...

    def close(self, timeout: float) -> bool:
        """Flush and release resources within ``timeout`` seconds; True if nothing was left undelivered."""
        ...


class SinkGroup:
    """Fans events out to several sinks; a sink that raises is logged, never propagated."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = tuple(sinks)

    def on_verdict(self, verdict: Verdict) -> None:
        self._each(lambda sink: sink.on_verdict(verdict))

    def on_transition(self, transition: Transition) -> None:
        self._each(lambda sink: sink.on_transition(transition))

    def close(self, timeout: float) -> bool:
        """Close every sink, sharing one deadline between them."""
        deadline = time.monotonic() + timeout
        results = self._each(lambda sink: sink.close(max(0.0, deadline - time.monotonic())))
        return all(r is True for r in results)

    def _each(self, call: Callable[[Sink], _T]) -> list[_T | None]:
        results: list[_T | None] = []
        for sink in self.sinks:
            try:
                results.append(call(sink))
            except Exception:  # a broken sink must never stop training
                logger.exception("alert sink %s failed", type(sink).__name__)
                results.append(None)
        return results
