"""Translate the daemon's status into Prometheus points (``streamtrain_<noun>_<unit>``).

Pure function of a status snapshot plus the trainer's tables, called once per loop turn;
the scrape thread reads the last snapshot (``metrics.SnapshotCollector``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from streamtrain.metrics import Point

if TYPE_CHECKING:
    from streamtrain.daemon import Daemon
    from streamtrain.publisher import PublishedVersion

_PIPELINE_COUNTERS = {
    "messages": ("streamtrain_events_consumed", "Messages consumed from the events topic."),
    "samples_emitted": ("streamtrain_samples_emitted", "Samples emitted by the joiner (corrections included)."),
    "corrections_emitted": ("streamtrain_samples_corrected", "emit_then_correct correction samples emitted."),
    "duplicates": ("streamtrain_events_duplicate", "Events dropped as duplicate event_id."),
    "forced_emissions": ("streamtrain_samples_forced", "Samples emitted early because the pending cap was hit."),
}

_TABLE_COUNTERS = ("admissions", "evictions", "spills", "cold_hits", "cold_misses", "rejections")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def metric_points(daemon: Daemon, status: dict[str, Any], current: PublishedVersion | None) -> list[Point]:
    """``current``: the CURRENT version the caller just read for ``status`` (read once per turn)."""
    return list(_points(daemon, status, current))


def _points(daemon: Daemon, status: dict[str, Any], current: PublishedVersion | None) -> Iterator[Point]:
    counters = status["counters"]
    topic = daemon.config.kafka.topic
    for key, (name, help_text) in _PIPELINE_COUNTERS.items():
        labels = {"topic": topic} if key == "messages" else {}
        yield Point(name, "counter", help_text, counters.get(key, 0), labels)
    for key, value in counters.items():
        if key.startswith("dlq."):
            yield Point("streamtrain_dlq_events", "counter", "Events sent to the dead-letter topic, by reason.",
                        value, {"reason": key[4:]})
    for partition, lag in sorted(status["lag"].items()):
        yield Point("streamtrain_consumer_lag_messages", "gauge", "Messages behind the high watermark (clamped at 0).",
                    max(0, lag), {"topic": topic, "partition": str(partition)})
    yield Point("streamtrain_train_steps", "counter", "Training steps taken.", status["steps"])
    yield Point("streamtrain_train_samples", "counter", "Samples trained on.", status["samples_trained"])
    yield Point("streamtrain_train_samples_per_second", "gauge", "Average training throughput since start.",
                status["samples_per_s"])
    for name, value in status["losses"].items():
        yield Point("streamtrain_loss", "gauge", "Loss of the last training step, by part.", value, {"part": name})
    yield from _monitor_points(status["monitors"])
    gate = status["gate"]
    yield Point("streamtrain_gate_open", "gauge", "1 while the publication gate is OPEN.", float(gate["state"] == "open"))
    last = daemon.monitors.gate.last_transition
    yield Point("streamtrain_gate_transitions", "counter", "Gate transitions (freezes and unfreezes).",
                last.seq if last is not None else 0)
    for name, module in daemon.trainer.tables.items():
        table = module.table
        yield Point("streamtrain_embedding_rows", "gauge", "Rows in use in a dynamic embedding table.", table.size, {"table": name})
        yield Point("streamtrain_embedding_load_factor", "gauge", "Rows in use / max_rows (the table's hard cap).", table.load_factor, {"table": name})
        for counter in _TABLE_COUNTERS:
            yield Point(f"streamtrain_embedding_{counter}", "counter", f"Embedding table {counter.replace('_', ' ')}.",
                        getattr(table.counters, counter), {"table": name})
    yield Point("streamtrain_checkpoints_written", "counter", "Checkpoints written by this process.", daemon.checkpoints_written)
    yield Point("streamtrain_checkpoint_failures", "counter", "Checkpoint writes that failed.", daemon.checkpoint_failures)
    if daemon._last_checkpoint_wall is not None:  # noqa: SLF001 - daemon-owned
        yield Point("streamtrain_checkpoint_age_seconds", "gauge", "Seconds since the last checkpoint.",
                    time.time() - daemon._last_checkpoint_wall)  # noqa: SLF001
    if current is not None:
        yield Point("streamtrain_published_version", "gauge", "Number of the CURRENT published version.", current.number)
        yield Point("streamtrain_published_age_seconds", "gauge", "Seconds since CURRENT was published.",
                    time.time() - float(current.manifest.get("created", time.time())))
    yield Point("streamtrain_releases_held", "counter", "Releases held back by the shadow check.", daemon.releases.held)


def _monitor_points(monitors: dict[str, Any]) -> Iterator[Point]:
    """Last verdict metrics, e.g. ``auc/ctr`` -> streamtrain_monitor_auc{head="ctr"}."""
    label_for = {"auc": "head", "logloss": "head", "calibration": "head", "rate": "label",
                 "psi": "feature", "js": "feature", "missing_rate": "feature", "repeat_rate": "feature"}
    for monitor in monitors.get("monitors", {}).values():
        verdict = monitor.get("last_verdict") or {}
        for key, value in verdict.get("metrics", {}).items():
            kind, _, subject = key.partition("/")
            if kind not in label_for or not _finite(value):
                continue
            yield Point(f"streamtrain_monitor_{kind}", "gauge", f"Last window's {kind.replace('_', ' ')}.",
                        float(value), {label_for[kind]: subject})
    for name, monitor in monitors.get("monitors", {}).items():
        yield Point("streamtrain_monitor_alarm", "gauge", "1 while a monitor is in alarm.", float(bool(monitor.get("alarm"))),
                    {"monitor": name})
