"""Drift scenarios through the real daemon: shared by ``tests/test_drift_scenarios.py`` and
the ``bench.monitors`` benchmark, which import it as ``tests.scenario_harness`` from the
repo root (on ``sys.path`` for ``python -m bench.monitors`` run there, and for pytest by
``pythonpath`` in ``pyproject.toml``).

A scenario is one seeded simulator log with at most one injected drift (``DriftSpec``),
produced to its own topic, then trained by an in-process :class:`~streamtrain.runtime.Daemon`
(real broker, real joiner, trainer, monitors, gate, publisher, checkpoints) until
``stop_after_samples``. :func:`run_scenario` records, without changing what the daemon does:

* every gate transition, read from ``gate.last_transition`` after each batch's monitor
  update (a prequential observer); a gap in the transition ``seq`` numbers would mean two
  transitions inside one batch and is an error rather than a silent loss;
* where the drift starts and ends in *sample* counts. The simulator switches drifts by
  exposure count, but samples leave the joiner when their label windows close, so the
  onset is the number of samples trained before the first sample whose event time is at
  or after the first drifted exposure's (the simulator is replayed in memory up to the
  drift's end to learn those timestamps from its ground truth);
* the published versions (name and the ``samples`` count in each manifest);
* wall time spent in ``MonitorSuite.update`` and in ``Trainer.step`` per batch (timing
  wrappers on the two instances: the daemon calls them as usual).

The world is small on purpose (50 users x 100 items, strong affinities, short conversion
delays): the tiny model of ``SMALL_CONFIG`` reaches a prequential AUC of ~0.8 within
10-20k samples, so a concept shift has something to destroy, and a whole scenario (37k
samples) trains in ~9 s on one core.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from consumers.schema import SampleBatch
from monitors.gate import Gate, GateState, Transition
from streamtrain.config import StreamtrainConfig, load_config
from streamtrain.runtime import Daemon, DaemonHooks
from streamtrain.simulator import DriftSpec, SimulatorConfig
from streamtrain.simulator.config import DriftKind
from streamtrain.simulator.stream import EventStream
from streamtrain.trainer import StepResult
from tests.daemon_harness import SMALL_CONFIG, deep_merge, produce_log, write_config

# The hidden world of every scenario (SimulatorConfig fields). Few users and items with a
# strong affinity (oracle AUC ~0.97) so the model learns fast; conversions within a minute,
# so that with a 1-minute convert window (DAEMON_OVERRIDES) the joiner's "wait" policy
# emits clicked samples ~1 min after the click. With SMALL_CONFIG's 1-hour window a clicked
# sample leaves the joiner an hour of event time after its click, beyond the end of a log
# this short: the trainer would see no positives at all.
WORLD: dict[str, Any] = {
    "users": 50,
    "items": 100,
    "factor_scale": 4.0,
    "convert_delay_median_s": 20.0,
    "max_convert_delay_s": 50.0,
}

# Monitor windows, in samples. 1000 samples carry ~80 clicks at the world's 8% CTR: enough
# for CTR and feature histograms. The AUC needs twice that: its standard error at 1000
# samples (~0.03) makes the drop test's 4-sigma tolerance ~0.12-0.15, about the size of
# the concept shift's AUC drop on this small model.
WINDOWS: dict[str, int] = {"label_ratio": 1000, "feature_drift": 1000, "auc": 2000}

# Daemon overrides on top of ``daemon_harness.SMALL_CONFIG``. Everything not named here
# keeps its shipped default (thresholds, warm-up, alarm_after=2, clear_after=3, auto unfreeze).
DAEMON_OVERRIDES: dict[str, Any] = {
    # Faster learning than the defaults so the model has learnt the world before the drift.
    "trainer": {"learning_rate": 0.01},
    "embeddings": {name: {"optimizer": {"lr": 0.1}} for name in ("item", "user", "sparse")},
    # Must cover the world's conversion delays (see WORLD).
    "joiner": {"convert_window_ms": 60_000},
    "monitors": {
        "label_ratio": {"window": WINDOWS["label_ratio"]},
        "feature_drift": {"window": WINDOWS["feature_drift"]},
        # The AUC reference is the mean of the warm-up windows, learnt while a fresh model is
        # still improving; with the default EWMA weight (0.2) the baseline trails the real
        # AUC by ~0.1 for several windows and hides part of a drop. 0.5 follows it in ~2 windows.
        "auc": {"window": WINDOWS["auc"], "baseline_alpha": 0.5},
    },
    # Release often, never held by the shadow check and never pruned: a gap in the
    # published versions can then only come from the gate.
    "publishing": {"every_samples": 512, "shadow_window": 0, "keep_versions": 10_000},
    "checkpoints": {"every_samples": 4096},
    "metrics": {"enabled": False},
    "control": {"enabled": False},
}

# The stop point is a multiple of the batch size.
BATCH: int = SMALL_CONFIG["trainer"]["batch_size"]
# Exposures at the end of the log that never become samples: the joiner emits a sample
# only once the watermark passes its label windows (~1 min of event time ~ 1500 exposures).
TAIL_EXPOSURES = 3000

# Which monitor is meant to catch each drift kind.
EXPECTED_MONITOR: dict[str, str] = {
    "label_shift": "label_ratio",
    "feature_shift": "feature_drift",
    "broken_feature": "feature_drift",
    "concept_shift": "auc",
}


@dataclass(frozen=True)
class Scenario:
    """One event log: ``exposures`` exposures of :data:`WORLD` with ``drift`` (or none)."""

    name: str
    exposures: int
    drift: DriftSpec | None = None

    @property
    def stop_after_samples(self) -> int:
        return (self.exposures - TAIL_EXPOSURES) // BATCH * BATCH

    @property
    def expected_monitor(self) -> str | None:
        return None if self.drift is None else EXPECTED_MONITOR[self.drift.kind]

    def simulator(self, seed: int) -> SimulatorConfig:
        return SimulatorConfig(seed=seed, exposures=self.exposures, drifts=[self.drift] if self.drift else [], **WORLD)


@dataclass(frozen=True)
class Layout:
    """Exposures before the drift, of drift, and after it (every scenario has the same length).

    ``onset`` leaves the model 20k samples to learn: the concept shift needs a model that
    ranks well (prequential AUC ~0.80-0.86 by then). With the drift at 12k (AUC ~0.70-0.80)
    the shift's AUC drop, 0.10-0.15, stayed inside the AUC monitor's 4-sigma tolerance, so
    unnoticed, in 4 of 6 seeds. ``tail`` leaves time to clear the alarms (clear_after=3
    windows) plus the joiner's tail.
    """

    onset: int = 20_000
    duration: int = 8_000
    tail: int = 12_000


def scenarios(layout: Layout = Layout()) -> dict[str, Scenario]:
    """The clean run and one scenario per drift kind, all of the same length."""
    onset, total = layout.onset, layout.onset + layout.duration + layout.tail

    def drift(kind: DriftKind, **kwargs: Any) -> DriftSpec:
        return DriftSpec(kind=kind, at_event=onset, until_event=onset + layout.duration, **kwargs)

    return {
        "clean": Scenario("clean", total),
        # CTR odds x6: CTR 0.08 -> 0.14 (+80%, "CTR nearly doubled") in this world, where
        # the strong affinities put many exposures near p=0 or p=1 so odds move CTR less than
        # usual. Weaker shifts, measured over seeds 0-5: odds x4 (+55-65%) froze in every
        # seed but took up to 5 windows (some windows fall under z=4); odds x2 (+30%) sits at
        # the default max_relative_deviation (0.3) and ~3 sigma of a 1000-sample window, so
        # it is by design not a reason to freeze.
        "label_shift": Scenario("label_shift", total, drift("label_shift", magnitude=6.0)),
        # item.price x2 and the device mix moves from 45/45/10 to 10/10/80 (ios/android/web).
        "feature_shift": Scenario("feature_shift", total, drift("feature_shift", magnitude=2.0)),
        # item.price becomes the constant 0.0.
        "broken_feature": Scenario("broken_feature", total, drift("broken_feature", feature="item.price")),
        # Every user's tastes are swapped for another set (the hidden world's user factors).
        "concept_shift": Scenario("concept_shift", total, drift("concept_shift")),
    }


def drift_span_ts(sim: SimulatorConfig, drift: DriftSpec) -> tuple[int, int | None]:
    """Event time ``[start, end)`` of the exposures ``drift`` touched (end None: never ends).

    Drifts switch at request boundaries: a request is drifted when the exposure count at
    its start is inside ``[at_event, until_event)``. A request's exposures share one ``ts``
    and requests have strictly increasing ``ts``, so the first exposure of a request is the
    lowest index carrying its ``ts``. The stream is replayed in memory (no Kafka) only as
    far as the drift's end.
    """
    last = drift.until_event if drift.until_event is not None else drift.at_event
    stream = EventStream(sim.model_copy(update={"exposures": last + sim.items_per_request + 1}))
    ts_of: dict[int, int] = {}
    for event in stream:
        if event.truth is not None:
            ts_of[int(event.truth["event_id"].rsplit("x", 1)[1])] = int(event.truth["ts"])
    request_start: dict[int, int] = {}  # ts -> index of the request's first exposure
    for index in sorted(ts_of):
        request_start.setdefault(ts_of[index], index)

    def first_ts_from(count: int) -> int | None:
        starts = [ts for ts, index in request_start.items() if index >= count]
        return min(starts) if starts else None

    start = first_ts_from(drift.at_event)
    if start is None:
        raise ValueError(f"the log ends before the drift starts ({drift})")
    return start, None if drift.until_event is None else first_ts_from(drift.until_event)


class WebhookRecorder:
    """A real HTTP server on 127.0.0.1 (free port) that stores every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with recorder._lock:
                    recorder.payloads.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output clean
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-recorder", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/alerts"

    def transitions(self) -> list[dict[str, Any]]:
        """The ``transition`` objects received (plain webhook payloads), in ``seq`` order."""
        with self._lock:
            return sorted((p["transition"] for p in self.payloads), key=lambda t: t["seq"])

    def __enter__(self) -> WebhookRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass
class ScenarioRun:
    """What one daemon run did, in sample counts."""

    scenario: Scenario
    seed: int
    config: StreamtrainConfig  # the daemon's effective config
    samples_trained: int
    stopped_by: str
    final_gate: GateState
    transitions: list[Transition]
    versions: list[tuple[str, int]]  # (version name, samples in its manifest), in order
    onset_sample: int | None  # samples trained before the first drifted sample
    end_sample: int | None  # samples trained before the first sample after the drift
    monitor_status: dict[str, Any]  # MonitorSuite.status() at the end
    monitor_seconds: list[float] = field(repr=False, default_factory=list)  # per batch
    step_seconds: list[float] = field(repr=False, default_factory=list)  # per batch, monitors included
    observer_seconds: float = 0.0  # this harness's own bookkeeping inside the steps

    @property
    def freezes(self) -> list[Transition]:
        return [t for t in self.transitions if t.from_state is GateState.OPEN and t.to_state is GateState.FROZEN]

    @property
    def reopens(self) -> list[Transition]:
        return [t for t in self.transitions if t.from_state is GateState.FROZEN and t.to_state is GateState.OPEN]

    @property
    def detection_delay(self) -> int | None:
        """Samples from the drift's first sample to the first freeze after it (None: none)."""
        if self.onset_sample is None:
            return None
        after = [t.sample_count for t in self.freezes if t.sample_count > self.onset_sample]
        return after[0] - self.onset_sample if after else None

    def frozen_spans(self) -> list[tuple[int, int | None]]:
        """``[freeze, reopen)`` sample-count spans; the last one is open-ended if still frozen."""
        spans: list[tuple[int, int | None]] = []
        for t in self.transitions:
            if t.to_state is GateState.FROZEN and t.from_state is GateState.OPEN:
                spans.append((t.sample_count, None))
            elif t.to_state is GateState.OPEN and spans and spans[-1][1] is None:
                spans[-1] = (spans[-1][0], t.sample_count)
        return spans

    def versions_published_while_frozen(self) -> list[tuple[str, int]]:
        """Versions whose manifest ``samples`` falls in a frozen span. A freeze at sample F
        (possibly mid-batch) forbids every release from that step on; the reopening step
        at R may release again, with ``samples >= R``."""
        return [(name, samples) for name, samples in self.versions
                for start, stop in self.frozen_spans() if start <= samples and (stop is None or samples < stop)]

    def train_seconds(self) -> float:
        """Time in ``Trainer.step`` minus what the monitors and this harness spent inside it."""
        return sum(self.step_seconds) - sum(self.monitor_seconds) - self.observer_seconds


_F = TypeVar("_F", bound=Callable[..., Any])


def _timed(fn: _F, sink: list[float]) -> _F:
    """``fn`` that appends its own wall time (seconds) to ``sink`` on every call."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


class _Recorder:
    """The daemon's ``on_trained`` hook: runs after each step, before the monitors see that
    batch, so a transition caused by one batch is recorded at the next (or by ``finish``)."""

    def __init__(self, span_ts: tuple[int, int | None] | None) -> None:
        self._gate: Gate | None = None
        self._span_ts = span_ts
        self._seen = 0  # samples observed before the current batch
        self.onset_sample: int | None = None
        self.end_sample: int | None = None
        self.transitions: list[Transition] = []
        self.seconds = 0.0
        self.step_seconds: list[float] = []

    def watch(self, gate: Gate) -> None:
        """Record ``gate``'s transitions (the daemon builds the gate after taking its observers)."""
        self._gate = gate

    def __call__(self, batch: SampleBatch, result: StepResult) -> None:
        started = time.perf_counter()
        self.step_seconds.append(result.seconds)
        if self._span_ts is not None:
            start_ts, end_ts = self._span_ts
            self.onset_sample = self.onset_sample if self.onset_sample is not None else self._first_at(batch, start_ts)
            if end_ts is not None and self.end_sample is None:
                self.end_sample = self._first_at(batch, end_ts)
        self._record_transition()
        self._seen += len(batch["ts"])
        self.seconds += time.perf_counter() - started

    def finish(self) -> None:
        """After the run: the last batch's transition, if it made one."""
        self._record_transition()

    def _record_transition(self) -> None:
        if self._gate is None:
            raise RuntimeError("watch(gate) was not called")
        last = self._gate.last_transition
        known = self.transitions[-1].seq if self.transitions else 0
        if last is not None and last.seq != known:
            if last.seq != known + 1:
                raise RuntimeError(f"gate transitions {known + 1}..{last.seq - 1} happened inside one batch "
                                   "and were not recorded")
            self.transitions.append(last)

    def _first_at(self, batch: SampleBatch, ts: int) -> int | None:
        hits = np.flatnonzero(batch["ts"] >= ts)
        return self._seen + int(hits[0]) if hits.size else None


def produce_scenario(bootstrap: str, topic: str, scenario: Scenario, seed: int) -> None:
    """Produce the scenario's log to ``topic`` (created with its DLQ, 2 partitions)."""
    produce_log(bootstrap, topic, **scenario.simulator(seed).model_dump())


def run_scenario(
    bootstrap: str,
    topic: str,
    work_dir: Path,
    scenario: Scenario,
    seed: int,
    *,
    webhook_url: str | None = None,
    overrides: dict[str, Any] | None = None,
    timeout_s: float = 180.0,
) -> ScenarioRun:
    """Train the log already in ``topic`` (see :func:`produce_scenario`) with the real daemon.

    ``overrides`` go on top of :data:`DAEMON_OVERRIDES` (the benchmark releases less often).
    The daemon runs on this thread until ``scenario.stop_after_samples``; a watchdog sets
    its stop event after ``timeout_s`` so a stream that runs dry fails instead of hanging.
    """
    alerts: dict[str, Any] = {"webhook_urls": [webhook_url]} if webhook_url else {}
    overrides = deep_merge(deep_merge(DAEMON_OVERRIDES, overrides or {}),
                           {"trainer": {"seed": seed}, "monitors": {"alerts": alerts}})
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(work_dir / "config.yaml", bootstrap, topic, work_dir / "run", **overrides)
    stop = threading.Event()
    span = None if scenario.drift is None else drift_span_ts(scenario.simulator(seed), scenario.drift)
    recorder = _Recorder(span)
    config = load_config(config_path, environ={})
    daemon = Daemon(config, stop=stop, stop_after_samples=scenario.stop_after_samples,
                    hooks=DaemonHooks(on_trained=recorder))
    recorder.watch(daemon.monitors.gate)
    monitor_seconds: list[float] = []
    daemon.monitors.update = _timed(daemon.monitors.update, monitor_seconds)  # type: ignore[method-assign]
    watchdog = threading.Timer(timeout_s, stop.set)
    watchdog.start()
    try:
        summary = daemon.run()
    finally:
        watchdog.cancel()
    recorder.finish()
    return ScenarioRun(
        scenario=scenario,
        seed=seed,
        config=config,
        samples_trained=summary.samples_trained,
        stopped_by=summary.stopped_by,
        final_gate=daemon.monitors.gate.state,
        transitions=recorder.transitions,
        versions=[(v.name, int(v.manifest["samples"])) for v in daemon.publisher.versions()],
        onset_sample=recorder.onset_sample,
        end_sample=recorder.end_sample,
        monitor_status=daemon.monitors.status(),
        monitor_seconds=monitor_seconds,
        step_seconds=recorder.step_seconds,
        observer_seconds=recorder.seconds,
    )
