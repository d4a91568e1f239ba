"""Test support: an in-memory source, a list DLQ sink, and a synthetic event stream.

Public so that other parts' tests (daemon, trainer) can drive an :class:`IngestPipeline`
without a broker, the way bytewax ships ``testing.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from consumers.batching import SampleBuffer
from consumers.config import JoinerConfig
from consumers.decode import key_for_user
from consumers.pipeline import IngestPipeline
from consumers.reasons import Rejection
from consumers.schema import SampleBatch, hash_id
from consumers.source import MessageBatch, Offsets, PartitionListener


class ListSource:
    """A :class:`~consumers.source.MessageSource` over in-memory partitions.

    ``interleave_seed=None`` delivers partitions round-robin one message at a time; a
    seed picks the next partition at random (seeded), to show that results do not
    depend on the interleaving. ``keys``: the message keys, per partition like the
    values; by default each message is keyed as DESIGN §3 producers key it
    (:func:`producer_key`).
    """

    def __init__(self, partitions: Mapping[int, Sequence[bytes | None]], topic: str = "events",
                 interleave_seed: int | None = None, keys: Mapping[int, Sequence[bytes | None]] | None = None,
                 end_of_input: bool = False) -> None:
        self.topic = topic
        self._markers = int(end_of_input)  # each log is followed by an end-of-input marker
        self._logs: dict[int, list[bytes | None]] = {p: list(v) for p, v in sorted(partitions.items())}
        if keys is None:
            keys = {p: [producer_key(v) for v in log] for p, log in self._logs.items()}
        self._keys: dict[int, list[bytes | None]] = {p: list(keys.get(p, ())) for p in self._logs}
        if any(len(self._keys[p]) != len(log) for p, log in self._logs.items()):
            raise ValueError("keys must give one key per message of every partition")
        self._next: dict[int, int] = dict.fromkeys(self._logs, 0)
        self._rng = None if interleave_seed is None else np.random.default_rng(interleave_seed)
        self._turn = 0
        self._paused = False
        self._listener: PartitionListener | None = None
        self.committed: dict[int, int] = {}  # what commit() was last given

    def set_listener(self, listener: PartitionListener) -> None:
        self._listener = listener
        listener.on_assign(sorted(self._logs))

    def consume(self, max_messages: int, timeout: float) -> MessageBatch:
        batch = MessageBatch()
        if self._paused:
            return batch
        while len(batch) < max_messages:
            ready = [p for p in self._logs if self._next[p] < len(self._logs[p]) + self._markers]
            if not ready:
                break
            if self._rng is None:
                p = ready[self._turn % len(ready)]
                self._turn += 1
            else:
                p = ready[int(self._rng.integers(len(ready)))]
            offset = self._next[p]
            if offset == len(self._logs[p]):  # the end-of-input marker
                batch.ended.append(p)
                self._next[p] = offset + 1
                continue
            batch.values.append(self._logs[p][offset])
            batch.partitions.append(p)
            batch.offsets.append(offset)
            batch.keys.append(self._keys[p][offset])
            self._next[p] = offset + 1
        return batch

    def remaining(self) -> int:
        """Messages (markers included) not consumed yet."""
        return sum(len(log) + self._markers - self._next[p] for p, log in self._logs.items())

    def positions(self) -> Offsets:
        return {self.topic: dict(self._next)}

    def seek(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        for p, o in offsets.get(self.topic, {}).items():
            self._next[int(p)] = int(o)

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> bool:
        self.committed = {p: int(o) for p, o in offsets.get(self.topic, {}).items()}
        return True

    def lag(self) -> dict[int, int]:
        return {p: len(log) + self._markers - self._next[p] for p, log in self._logs.items()}

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def close(self) -> None:
        self._paused = True


def pipeline_checkpoint(pipeline: IngestPipeline) -> dict[str, Any]:
    """What a checkpoint holds of a pipeline: its state and, beside it, its positions (the
    daemon keeps those in the manifest). JSON-safe keys, as in a real checkpoint."""
    positions = {t: {str(p): o for p, o in parts.items()} for t, parts in pipeline.positions().items()}
    return {"pipeline": pipeline.state_dict(), "positions": positions}


def restore_pipeline(pipeline: IngestPipeline, checkpoint: Mapping[str, Any]) -> None:
    """Restore :func:`pipeline_checkpoint` output: the state, then a seek to the positions."""
    pipeline.load_state_dict(checkpoint["pipeline"])
    pipeline.seek({t: {int(p): int(o) for p, o in parts.items()} for t, parts in checkpoint["positions"].items()})


class BatchedPipeline:
    """A pipeline cut into fixed-size batches the way the daemon does it (pipeline ->
    :class:`~consumers.batching.SampleBuffer`), with one state for both plus the positions:
    what a checkpoint holds, for tests and benchmarks that replay without a daemon."""

    def __init__(self, pipeline: IngestPipeline, batch_size: int) -> None:
        self.pipeline = pipeline
        self.buffer = SampleBuffer(batch_size)

    def poll(self, max_messages: int = 2000, timeout: float = 0.5) -> list[SampleBatch]:
        for samples in self.pipeline.poll(max_messages, timeout):
            self.buffer.extend(samples)
        return self._full()

    def flush(self) -> list[SampleBatch]:
        """End of input: every remaining sample, the last batch possibly partial."""
        for samples in self.pipeline.flush():
            self.buffer.extend(samples)
        full = self._full()
        rest = self.buffer.drain()
        return full + ([rest] if rest is not None else [])

    def _full(self) -> list[SampleBatch]:
        out = []
        while (batch := self.buffer.pop_batch()) is not None:
            out.append(batch)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**pipeline_checkpoint(self.pipeline), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_pipeline(self.pipeline, state)
        self.buffer.load_state_dict(state["buffer"])


def producer_key(value: bytes | None) -> bytes | None:
    """The key a DESIGN §3 producer gives ``value``: its user_id (:func:`key_for_user`);
    None when ``value`` is not an event object with a string or integer user_id."""
    try:
        event = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        return None
    user = event.get("user_id") if type(event) is dict else None
    return key_for_user(user) if type(user) in (str, int) else None


class ListDlqSink:
    def __init__(self) -> None:
        self.rejections: list[Rejection] = []

    def send(self, rejections: Sequence[Rejection]) -> None:
        self.rejections.extend(rejections)

    def flush(self, timeout_s: float) -> int:
        return 0


@dataclass(frozen=True)
class StreamSpec:
    """A synthetic world: requests of several exposures; some clicked, some converted."""

    exposures: int = 1000
    users: int = 50
    items: int = 500
    items_per_request: int = 5
    request_gap_ms: int = 200  # event time between requests
    click_rate: float = 0.05
    convert_rate: float = 0.1  # of clicks
    click_delay_ms: tuple[int, int] = (100, 30_000)  # uniform range
    convert_delay_ms: tuple[int, int] = (1_000, 120_000)  # after the click
    start_ts: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    seed: int = 0


def synthetic_events(spec: StreamSpec) -> list[dict[str, Any]]:
    """Events (as dicts) in event-time order; features on exposures. Deterministic."""
    rng = np.random.default_rng(spec.seed)
    events: list[dict[str, Any]] = []
    n_requests = -(-spec.exposures // spec.items_per_request)
    made = 0
    for r in range(n_requests):
        ts = spec.start_ts + r * spec.request_gap_ms
        user = f"u{int(rng.integers(spec.users))}"
        request = f"r{spec.seed}-{r}"
        shown: set[str] = set()
        while len(shown) < min(spec.items_per_request, spec.exposures - made, spec.items):
            shown.add(f"i{int(rng.zipf(1.3)) % spec.items}")  # popularity-skewed, distinct per request
        for j, item in enumerate(sorted(shown)):
            base = {"user_id": user, "item_id": item, "request_id": request}
            eid = f"x{spec.seed}-{made}"
            events.append({"event_id": eid, "type": "exposure", "ts": ts, **base,
                           "user_features": {"segment": f"s{int(user[1:]) % 4}"},
                           "item_features": {"category": f"c{int(item[1:]) % 10}", "price": float(int(item[1:]) % 50) + 0.5},
                           "context": {"device": ("ios", "android", "web")[j % 3]}})
            if rng.random() < spec.click_rate:
                click_ts = ts + int(rng.integers(*spec.click_delay_ms))
                events.append({"event_id": f"{eid}-c", "type": "click", "ts": click_ts, **base})
                if rng.random() < spec.convert_rate:
                    events.append({"event_id": f"{eid}-v", "type": "convert",
                                   "ts": click_ts + int(rng.integers(*spec.convert_delay_ms)), **base})
            made += 1
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    return events


def partition_of(user_id: str, partitions: int) -> int:
    """Stable key -> partition mapping for fakes (Kafka's murmur2 is not needed here)."""
    return sum(user_id.encode()) % partitions


def encode_partitioned(events: Sequence[dict[str, Any]], partitions: int) -> dict[int, list[bytes]]:
    """Message values per partition, keyed by user like the producers do."""
    out: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    for e in events:
        out[partition_of(str(e["user_id"]), partitions)].append(orjson.dumps(e))
    return out


def reference_joins(events: Sequence[dict[str, Any]], cfg: JoinerConfig) -> dict[int, tuple[int, int, int | None]]:
    """The label rules, written the slow, obvious way: sample_id -> (click, convert, click ts)."""
    by_key: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for e in events:
        by_key.setdefault((e["request_id"], e["item_id"]), []).append(e)
    out = {}
    for x in (e for e in events if e["type"] == "exposure"):
        same = by_key[(x["request_id"], x["item_id"])]
        clicks = [e["ts"] for e in same if e["type"] == "click" and x["ts"] <= e["ts"] <= x["ts"] + cfg.click_window_ms]
        click_ts = min(clicks) if clicks else None
        converted = click_ts is not None and any(
            e["type"] == "convert" and click_ts <= e["ts"] <= click_ts + cfg.convert_window_ms for e in same)
        out[hash_id(x["event_id"])] = (int(click_ts is not None), int(converted), click_ts)
    return out


def reference_labels(events: Sequence[dict[str, Any]], cfg: JoinerConfig) -> dict[int, tuple[int, int]]:
    return {sid: (click, convert) for sid, (click, convert, _) in reference_joins(events, cfg).items()}
