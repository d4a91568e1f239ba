"""Translate a :class:`~streamtrain.runtime.status.DaemonStatus` into Prometheus points.

A pure function of the snapshot (``streamtrain_<noun>_<unit>``, ``_total`` added to
counters by the exposition). This is the one path by which component state becomes
metrics: monitors, gate, pipeline, tables, checkpoints and releases alike. Latency
histograms are observed as they happen instead (``runtime/metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from consumers.decode import DECODE_COUNTERS
from consumers.reasons import Reason
from streamtrain.runtime.metrics import Point
from streamtrain.runtime.status import DaemonStatus

_PIPELINE_COUNTERS = {
    "messages": ("streamtrain_events_consumed", "Messages consumed from the events topic."),
    "samples_emitted": ("streamtrain_samples_emitted", "Samples emitted by the joiner (corrections included)."),
    "corrections_emitted": ("streamtrain_samples_corrected", "emit_then_correct correction samples emitted."),
    "duplicates": ("streamtrain_events_duplicate", "Events dropped as duplicate event_id."),
    "forced_emissions": ("streamtrain_samples_forced", "Samples emitted early because the pending cap was hit."),
    "events_quarantined": ("streamtrain_events_quarantined",
                           "Events held because they were far ahead of their partition's clock."),
    "partition_anchors": ("streamtrain_partition_anchors", "Partition clocks set or moved by a confirmed run of events."),
    "forced_anchors": ("streamtrain_partition_forced_anchors",
                       "Partition clocks anchored because the quarantine overflowed or the input ended."),
    "forced_watermark_advances": ("streamtrain_watermark_forced_advances",
                                  "Watermark pushed on because the reorder buffer was full."),
    "conversion_waits_expired": ("streamtrain_conversion_waits_expired",
                                 "Clicked samples whose conversion window closed without one."),
    "state_repairs": ("streamtrain_joiner_state_repairs",
                      "Partition clocks (or the watermark) a restored state could not support, repaired."),
}

_TABLE_COUNTERS = ("admissions", "evictions", "spills", "cold_hits", "cold_misses", "rejections")

# Last-window metric kinds of the monitors and the label naming their subject,
# e.g. ``auc/ctr`` -> streamtrain_monitor_auc{head="ctr"}.
_MONITOR_LABELS = {"auc": "head", "logloss": "head", "calibration": "head", "rate": "label",
                   "psi": "feature", "js": "feature", "missing_rate": "feature", "repeat_rate": "feature"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def metric_points(status: DaemonStatus, now: Callable[[], float] = time.time) -> list[Point]:
    """Every metric of one snapshot; ``now`` (unix seconds) ages checkpoints and versions."""
    return list(_points(status, now()))


def _points(status: DaemonStatus, now: float) -> Iterator[Point]:
    counters = status.counters
    for key, (name, help_text) in _PIPELINE_COUNTERS.items():
        labels = {"topic": status.topic} if key == "messages" else {}
        yield Point(name, "counter", help_text, counters.get(key, 0), labels)
    # Every reason from the start, at 0 until it happens: rate() and alerts see the first
    # bad event as an increase instead of a series that appears already at 1.
    reasons = {r.value for r in Reason} | {k[4:] for k in counters if k.startswith("dlq.")}
    for reason in sorted(reasons):
        yield Point("streamtrain_dlq_events", "counter", "Events sent to the dead-letter topic, by reason.",
                    counters.get(f"dlq.{reason}", 0), {"reason": reason})
    yield Point("streamtrain_dlq_majority_polls", "counter",
                "Polls of this process whose messages mostly went to the DLQ (a producer or a setting is wrong).",
                status.dead_polls)
    for key in DECODE_COUNTERS:
        yield Point("streamtrain_events_degraded", "counter",
                    "Accepted events with a feature value read as missing or inexact, by kind (docs/events.md).",
                    counters.get(key, 0), {"kind": key})
    for partition, lag in sorted(status.lag.items()):
        yield Point("streamtrain_consumer_lag_messages", "gauge",
                    "Messages between the consumer's position and the end of the partition.",
                    max(0, lag), {"topic": status.topic, "partition": str(partition)})
    for key, value in status.held.items():
        yield Point(f"streamtrain_joiner_{key}", "gauge", f"Joiner {key.replace('_', ' ')} right now.", value)
    if status.watermark is not None:
        yield Point("streamtrain_watermark_seconds", "gauge", "Event-time watermark of the joiner (unix seconds).",
                    status.watermark / 1000.0)
    yield Point("streamtrain_train_steps", "counter", "Training steps taken.", status.steps)
    yield Point("streamtrain_train_samples", "counter", "Samples trained on.", status.samples_trained)
    yield Point("streamtrain_train_samples_per_second", "gauge", "Average training throughput since start.",
                status.samples_per_s)
    for name, value in status.losses.items():
        yield Point("streamtrain_loss", "gauge", "Loss of the last training step, by part.", value, {"part": name})
    yield from _monitor_points(status.monitors)
    yield Point("streamtrain_gate_open", "gauge", "1 while the publication gate is OPEN.",
                float(status.gate.get("state") == "open"))
    yield Point("streamtrain_gate_transitions", "counter", "Gate transitions (freezes and unfreezes).",
                status.gate_transitions)
    for cause, holds in sorted(freeze_causes(status.gate, status.monitors).items()):
        yield Point("streamtrain_gate_frozen_by", "gauge",
                    "1 while this cause holds the gate FROZEN: a monitor in alarm, operator (a manual freeze), or "
                    "awaiting_unfreeze (alarms cleared, gate.unfreeze=manual).", float(holds), {"cause": cause})
    for name, table in status.tables.items():
        yield Point("streamtrain_embedding_rows", "gauge", "Rows in use in a dynamic embedding table.", table.rows,
                    {"table": name})
        yield Point("streamtrain_embedding_load_factor", "gauge", "Rows in use / max_rows (the table's hard cap).",
                    table.load_factor, {"table": name})
        for counter in _TABLE_COUNTERS:
            yield Point(f"streamtrain_embedding_{counter}", "counter", f"Embedding table {counter.replace('_', ' ')}.",
                        table.counters.get(counter, 0), {"table": name})
    yield Point("streamtrain_checkpoints_written", "counter", "Checkpoints written by this process.",
                status.checkpoints_written)
    yield Point("streamtrain_checkpoint_failures", "counter", "Checkpoint writes that failed.", status.checkpoint_failures)
    if status.last_checkpoint_wall is not None:
        yield Point("streamtrain_checkpoint_age_seconds", "gauge", "Seconds since the last checkpoint.",
                    now - status.last_checkpoint_wall)
    if status.current_version is not None:
        yield Point("streamtrain_published_version", "gauge", "Number of the CURRENT published version.",
                    status.current_version.number)
        yield Point("streamtrain_published_age_seconds", "gauge", "Seconds since CURRENT was published.",
                    now - status.current_version.created)
    for key, help_text in (("released", "Model versions published."), ("held", "Releases held back by the shadow check."),
                           ("rollbacks", "CURRENT moved back by the rollback action."),
                           ("failures", "Releases that failed to write.")):
        yield Point(f"streamtrain_releases_{key}", "counter", help_text, status.releases.get(key, 0))
    yield from _overload_points(status.overload)
    yield from _redis_points(status)


def _overload_points(overload: dict[str, float]) -> Iterator[Point]:
    """Down-sampling and the lag alarm (runtime/overload.py)."""
    if not overload:
        return
    yield Point("streamtrain_overload_keep_rate", "gauge",
                "Share of unclicked exposures trained (1: no down-sampling); changes only at checkpoints.",
                overload["keep_rate"])
    yield Point("streamtrain_overload_lag_alarm", "gauge", "1 while the consumer lag alarm is raised.",
                overload["lag_alarm"])
    if overload["backlog_s"] >= 0:
        yield Point("streamtrain_overload_backlog_seconds", "gauge",
                    "Consumer lag divided by the consumption speed: seconds to drain the backlog at the current pace.",
                    overload["backlog_s"])
    if "rows_dropped" in overload:
        yield Point("streamtrain_overload_rows_dropped", "counter",
                    "Unclicked exposures dropped by down-sampling (never trained, never scored).",
                    overload["rows_dropped"])
        yield Point("streamtrain_overload_rows_offered", "counter",
                    "Samples that reached the down-sampler (kept + dropped).", overload["rows_offered"])


def _redis_points(status: DaemonStatus) -> Iterator[Point]:
    """Redis-backed popularity (backend=redis) and the serving push (redis.url set), when present."""
    counters = status.counters
    if "popularity.source_redis" in counters:
        yield Point("streamtrain_popularity_source_redis", "gauge",
                    "1 while popularity and CTR priors come from the stats worker's snapshot, 0 on local counts.",
                    counters["popularity.source_redis"])
        for result, key in (("ok", "fetches"), ("error", "fetch_errors"), ("missing", "fetch_missing")):
            yield Point("streamtrain_popularity_fetches", "counter",
                        "Stats snapshot fetches from Redis at checkpoints, by result (error/missing: local counts next).",
                        counters.get(f"popularity.{key}", 0), {"result": result})
        for source, key in (("redis", "redis_refreshes"), ("local", "local_refreshes")):
            yield Point("streamtrain_popularity_refreshes", "counter",
                        "Event-time popularity refreshes, by where lookups answered from afterwards.",
                        counters.get(f"popularity.{key}", 0), {"source": source})
    if "serving_pushes" in status.releases:
        for key, help_text in (("pushes", "Published versions written to Redis for serving."),
                               ("full_pushes", "Serving pushes that wrote every row (no base version in Redis)."),
                               ("failures", "Serving syncs that failed (the version on disk stands; retried).")):
            yield Point(f"streamtrain_serving_{key}", "counter", help_text, status.releases.get(f"serving_{key}", 0))


def _monitor_points(suite: dict[str, Any]) -> Iterator[Point]:
    monitors = suite.get("monitors", {})
    for monitor in monitors.values():
        verdict = monitor.get("last_verdict") or {}
        for key, value in verdict.get("metrics", {}).items():
            kind, _, subject = key.partition("/")
            if kind not in _MONITOR_LABELS or not _finite(value):
                continue
            yield Point(f"streamtrain_monitor_{kind}", "gauge", f"Last window's {kind.replace('_', ' ')}.",
                        float(value), {_MONITOR_LABELS[kind]: subject})
    for name, monitor in monitors.items():
        labels = {"monitor": name}
        yield Point("streamtrain_monitor_alarm", "gauge", "1 while a monitor is in alarm.", float(bool(monitor.get("alarm"))),
                    labels)
        yield Point("streamtrain_monitor_warming_up", "gauge", "1 while a monitor learns its reference.",
                    float(bool(monitor.get("warming_up"))), labels)
        yield Point("streamtrain_monitor_samples", "counter", "Samples a monitor has seen.", monitor.get("samples", 0),
                    labels)


def freeze_causes(gate: dict[str, Any], suite: dict[str, Any]) -> dict[str, bool]:
    """Every cause that can hold the gate, and whether it holds it now: each monitor (in
    alarm and not acknowledged by an operator's unfreeze), ``operator`` (a manual freeze),
    ``awaiting_unfreeze`` (FROZEN with neither: alarms cleared under ``unfreeze: manual``).
    Label values come from this closed set, never from the free-text reason (the reason is
    in ``GET /status`` and the report), so the series stay few."""
    frozen = gate.get("state") == "frozen"
    alarms = set(gate.get("alarms", {})) - set(gate.get("acknowledged", []))
    causes = {name: frozen and name in alarms for name in set(suite.get("monitors", {})) | alarms}
    causes["operator"] = frozen and bool(gate.get("manual_freeze"))
    causes["awaiting_unfreeze"] = frozen and not any(causes.values())
    return causes
