"""The stream statistics worker (`streamtrain stats`): a faust-streaming app that counts the
events topic per item and per user and writes snapshots to Redis.

One step (``StatsWorker._count``, up to ``take_max`` messages)::

    messages -> exactly-once cursor per partition -> EventDecoder (bad input skipped, counted)
             -> PartialCounts.apply (items, users; consumers/stats_state.py)
             -> changelog: the changed rows, then the partition's progress, per table
    every snapshot_every_s: merge the partials -> records -> Redis (consumers/stats_store.py),
                            written from a thread so the broker heartbeats go on
    on a graceful stop:     one more snapshot, after the last step (nothing counted is lost
                            to Redis by a deploy or a stop before the first tick)

Bad input is counted here (``skipped``, by reason, in each snapshot's meta: counters of
this process, like every Prometheus counter) and nowhere else: the daemon's DLQ stays the
one place bad events are recorded.

Tables and recovery. Two Faust tables (``items``, ``users``) with changelog topics hold
every row as a fixed-size binary record under a (partition, id) key. Faust only replays
them: after its recovery the rows move into :class:`~consumers.stats_state.PartialCounts`
(numpy, where steps and snapshots are vectorised) and the store is emptied; every step
writes the changed rows straight to the changelog. Each step ends with a progress record
per partition (the next offset), after that step's rows in the same changelog partition,
so any prefix of a changelog is a consistent state to resume from. That matters: Faust
reads a changelog up to the broker's high watermark, which the embedded broker (Tansu)
reports below the real end (measured: 9,685 of 10,000 records recovered after a clean
stop) — and the group's committed offsets are past what was recovered. So after a
recovery the worker resumes every partition at its recovered progress (the lower of the
two tables'), seeking back when the consumer starts later — after every step until the
re-read begins, since Faust still hands out what it fetched before a seek and each such
message moves its read offset past the seek. Rows remember the last offset applied to
them, so what is read twice is counted once (exactly-once effect).

Faust quirks handled here: the web server is off unless ``web_port`` is set, and binds
127.0.0.1 either way (DESIGN §6.5); a group's first join waits half the session timeout
(use 6000 ms locally); topic values are raw bytes (Faust's default JSON codec silently
drops anything else).

One active worker per events topic: a snapshot covers the partitions this worker owns,
and two workers would each write half. Run a second one only as a standby.

Imports nothing of ``streamtrain`` (a leaf, like the rest of ``consumers/``); the CLI
(``streamtrain/cli/stats_cmd.py``) builds :class:`StatsSettings` from the config.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import numpy as np
from faust.types import TP

from consumers.config import DecoderConfig, StatsConfig
from consumers.decode import EventDecoder
from consumers.markers import is_end_of_input
from consumers.ratelimit import RateLimitedLog
from consumers.stats_state import KEY_DTYPE, PartialCounts
from consumers.stats_store import Priors, StatsKeys, build_snapshot, write_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsSettings:
    bootstrap_servers: str
    topic: str
    redis_url: str
    key_prefix: str
    stats: StatsConfig
    decoder: DecoderConfig
    priors: Priors
    data_dir: Path  # Faust's data directory (unused by the memory store, but Faust wants one)
    session_timeout_ms: int = 6000
    partitions: int | None = None  # of the events topic (changelogs get as many); None: asked of the broker


def topic_partitions(bootstrap_servers: str, topic: str, timeout_s: float = 30.0) -> int:
    """Partitions of ``topic``, waiting up to ``timeout_s`` for it to exist."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(timeout=5)
        if topic in meta.topics and meta.topics[topic].partitions:
            return len(meta.topics[topic].partitions)
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic!r} does not exist on {bootstrap_servers} (waited {timeout_s:.0f}s)")
        time.sleep(0.5)


def _headers(message: Any) -> list[tuple[str, bytes | None]]:
    headers = message.headers or ()
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _split(blob: bytes, size: int) -> list[bytes]:
    return [blob[i:i + size] for i in range(0, len(blob), size)]


class StatsWorker:
    """The Faust app and its state. ``run()`` blocks until SIGTERM/SIGINT (graceful)."""

    def __init__(self, settings: StatsSettings, redis_client: Any = None) -> None:
        self.settings = settings
        cfg = settings.stats
        if redis_client is None:
            import redis

            redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=30.0, socket_connect_timeout=2.0)
        self.redis = redis_client
        self.keys = StatsKeys(settings.key_prefix)
        self.decoder = EventDecoder(settings.decoder, (), ())  # no features: only ids, types and times count
        self.counts = {"item": PartialCounts(cfg), "user": PartialCounts(cfg)}
        self.cursor: dict[int, int] = {}  # partition -> next offset to apply
        self._rewinding: dict[int, int] = {}  # partition -> first offset dropped after asking for a seek back
        self._seek_back: set[int] = set()  # partitions to seek back to their cursor at the end of this step
        self._recovered: set[str] = set()  # tables whose rows are loaded since the last assignment
        self._expired_bucket: dict[int, int] = {}  # partition -> bucket of its clock at the last expiry pass
        self.counters: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()  # bad input, by decoder reason
        self._writing: asyncio.Future[Any] | None = None
        self._redis_errors = RateLimitedLog(60.0, time.monotonic, log)
        self.app = self._build_app()

    # ------------------------------------------------------------------ wiring
    def _build_app(self) -> faust.App:
        s, cfg = self.settings, self.settings.stats
        partitions = s.partitions or topic_partitions(s.bootstrap_servers, s.topic)
        s.data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
        app = faust.App(
            cfg.app_id,
            broker="kafka://" + s.bootstrap_servers.replace(",", ";"),
            store="memory://",
            autodiscover=False,
            datadir=str(s.data_dir),
            topic_partitions=partitions,
            topic_replication_factor=cfg.changelog_replication,
            broker_session_timeout=s.session_timeout_ms / 1000.0,
            consumer_auto_offset_reset="earliest",
            producer_linger=0.01,  # batch the many small changelog records of a step
            web_enabled=cfg.web_port is not None,
            web_bind="127.0.0.1",  # Faust's default is 0.0.0.0, even when the server is off
            web_host="127.0.0.1",
            web_port=cfg.web_port or 6066,
            worker_redirect_stdouts=False,
        )
        self.source = app.topic(s.topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                                value_serializer="raw")
        self.tables = {kind: app.Table(f"{kind}s", key_type=bytes, value_type=bytes, partitions=partitions,
                                       on_recover=self._on_recover(kind)) for kind in self.counts}
        app.agent(self.source, name=f"{cfg.app_id}.count")(self._count)
        app.timer(cfg.snapshot_every_s)(self._snapshot)
        app.on_partitions_revoked.connect(self._on_revoked, weak=False)
        app.on_before_shutdown.connect(self._final_snapshot, weak=False)
        return app

    def run(self) -> int:
        """Run the worker until a signal stops it; its exit code."""
        worker = faust.Worker(self.app, quiet=True, override_logging=False, redirect_stdouts=False)
        worker.spinner = None  # a progress spinner would write escape codes into the logs
        try:
            worker.execute_from_commandline()
        except SystemExit as stop:
            return int(stop.code or 0)
        return 0

    # ------------------------------------------------------------------ recovery
    def _on_recover(self, kind: str) -> Any:
        async def recovered() -> None:
            """Faust replayed this table's changelog into its store: move the rows into the
            counts, empty the store, and re-derive the cursors before the next step."""
            table, counts = self.tables[kind], self.counts[kind]
            rows = [(k, v) for k, v in table.data.items()
                    if len(k) == KEY_DTYPE.itemsize and v is not None and len(v) == counts.dtype.itemsize]
            if rows:
                counts.load(np.frombuffer(b"".join(k for k, _ in rows), KEY_DTYPE),
                            np.frombuffer(b"".join(v for _, v in rows), counts.dtype))
            table.data.clear()  # the counts hold them now; the store would be a second copy
            self._recovered.add(kind)
            self.cursor.clear()
            log.info("stats: %s restored from the changelog: %d rows, progress %s", kind, len(rows),
                     dict(sorted(counts.progress.items())))

        return recovered

    async def _on_revoked(self, app: faust.App, revoked: set[TP], **_: Any) -> None:
        gone = {tp.partition for tp in revoked if tp.topic == self.settings.topic}
        for counts in self.counts.values():
            counts.drop_partitions(gone)
        self._recovered.clear()
        self.cursor.clear()

    async def _start_at(self, partitions: list[int]) -> None:
        """Resume ``partitions`` at their recovered progress (the lower of the two tables'),
        or at their first offset when a table has none."""
        tps = [TP(self.settings.topic, p) for p in partitions]
        earliest = await self.app.consumer.earliest_offsets(*tps) if tps else {}
        for tp in tps:
            starts = [c.progress.get(tp.partition) for c in self.counts.values()]
            self.cursor[tp.partition] = min(earliest.get(tp, 0) if s is None else s for s in starts)
            self._rewinding.pop(tp.partition, None)
        log.info("stats: resuming at %s", {p: self.cursor[p] for p in partitions})

    # ------------------------------------------------------------------ the step
    async def _count(self, stream: Any) -> None:
        cfg = self.settings.stats
        async for events in stream.take_events(cfg.take_max, within=cfg.take_within_s):
            await self._step(events)

    async def _step(self, events: list[Any]) -> None:
        in_order = [e.message for e in events if await self._in_order(e.message)]
        accepted = [m for m in in_order if not is_end_of_input(m.value, _headers(m))]  # markers are no events
        self.counters["messages"] += len(events)
        await self._seek_back_where_asked()
        if not in_order:
            return
        decoded = self.decoder.decode([m.value for m in accepted], [m.partition for m in accepted],
                                      [m.offset for m in accepted], [m.key for m in accepted])
        self.skipped.update(r.reason.value for r in decoded.rejections)
        ev = decoded.events
        self.counters["applied"] += len(ev)
        for partition in sorted({m.partition for m in in_order}):
            mine = ev.partition == partition
            for kind, ids in (("item", ev.item), ("user", ev.user)):
                counts = self.counts[kind]
                rows, skipped = counts.apply(partition, ev.offset[mine], ids[mine], ev.etype[mine], ev.ts[mine])
                self.counters["already_counted"] += skipped if kind == "item" else 0
                counts.progress[partition] = self.cursor[partition]
                await self._send_rows(kind, partition, counts.keys(rows), counts.records(rows))
                await self._send_rows(kind, partition, *counts.progress_record(partition))
            await self._maybe_expire(partition)

    async def _seek_back_where_asked(self) -> None:
        """Seek rewinding partitions back to their cursor, at the end of every step until
        the re-read begins. Once is not enough: messages Faust fetched before a seek are
        still delivered after it, and each moves Faust's read offset past the seek, so
        Faust then drops the re-read as already seen."""
        for partition in sorted(self._seek_back):
            if partition in self._rewinding:
                self.counters["seeks"] += 1
                await self.app.consumer.seek(TP(self.settings.topic, partition), self.cursor[partition])
        self._seek_back.clear()

    async def _in_order(self, message: Any) -> bool:
        """Exactly-once cursor: take the message at the partition's next offset; skip what
        is behind it; when the consumer is ahead (it resumed at committed offsets past the
        recovered progress), seek back and drop until the re-read begins. The re-read
        restarts at or below the first dropped offset, so the first such message is the
        continuation (offsets may skip, e.g. over transaction markers)."""
        partition, offset = message.partition, message.offset
        if partition not in self.cursor:  # first message since the partition was assigned and recovered
            await self._start_at([partition])
        cursor = self.cursor[partition]
        first_dropped = self._rewinding.get(partition)
        if first_dropped is not None:
            if offset > first_dropped:
                self._seek_back.add(partition)  # fetched before the seek (which it may have undone)
                return False
            del self._rewinding[partition]
        elif offset > cursor:
            self._rewinding[partition] = offset
            self._seek_back.add(partition)
            self.counters["rewinds"] += 1
            return False
        if offset < cursor:
            self.counters["already_read"] += 1
            return False
        self.cursor[partition] = offset + 1
        return True

    async def _send_rows(self, kind: str, partition: int, keys: np.ndarray, values: np.ndarray | None) -> None:
        """Changelog records straight to the producer (Faust's table API buffers them one by
        one through its own queue, ~1,500 a second here); ``values`` None: tombstones."""
        topic = self.tables[kind].changelog_topic.get_topic_name()
        send = self.app.producer.send
        blobs = _split(values.tobytes(), values.itemsize) if values is not None else [None] * len(keys)
        for key, value in zip(_split(keys.tobytes(), KEY_DTYPE.itemsize), blobs):
            await send(topic, key, value, partition, None, None)

    async def _maybe_expire(self, partition: int) -> None:
        """Drop ids forgotten in event time, once per bucket the partition's clock enters."""
        clock = self.counts["item"].clock.get(partition)
        if clock is None:
            return
        bucket = clock // self.settings.stats.bucket_ms
        if self._expired_bucket.setdefault(partition, bucket) == bucket:
            return
        self._expired_bucket[partition] = bucket
        for kind, counts in self.counts.items():
            gone = counts.expire()
            self.counters["forgotten"] += len(gone)
            for p in np.unique(gone["partition"]).tolist():
                await self._send_rows(kind, p, gone[gone["partition"] == p], None)

    # ------------------------------------------------------------------ snapshots
    async def _final_snapshot(self, app: faust.App, **_: Any) -> None:
        """On a graceful stop (SIGTERM: a deploy, the demo's end), once the consumer has
        stopped and the agent has applied what it was given: what was counted since the last
        timer tick goes to Redis too, so a stop loses no counts there and a worker stopped
        before its first tick still leaves a snapshot."""
        if self._writing is not None:
            await asyncio.wait([self._writing])  # the tick's write first: one writer at a time
        await self._snapshot()

    async def _snapshot(self) -> None:
        """Merge, then write from a thread (the event loop keeps heartbeating); one at a time.
        Skipped until both tables are recovered (an empty early snapshot would replace the
        previous process's good one) and while nothing was counted."""
        if self._writing is not None and not self._writing.done():
            return
        clock = self.counts["item"].max_clock
        if self._recovered != set(self.counts) or clock is None:
            return
        started = time.perf_counter()
        cfg = self.settings.stats
        info = {"positions": {str(p): o for p, o in sorted(self.cursor.items())}, "skipped": dict(self.skipped),
                **{k: self.counters[k] for k in ("messages", "applied", "already_read", "rewinds", "seeks")},
                "bucket_ms": cfg.bucket_ms, "window_buckets": cfg.window_buckets, "half_life_ms": cfg.half_life_ms,
                "forget_after_ms": cfg.forget_after_ms}
        snap = build_snapshot(self.counts["item"].merged(clock), self.counts["user"].merged(clock),
                              self.settings.priors, info)
        grace = int(min(cfg.ttl_s, max(60.0, 3 * cfg.snapshot_every_s)))
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(None, write_snapshot, self.redis, self.keys, snap, cfg.ttl_s, grace)
        try:
            n = await self._writing
        except Exception as exc:  # noqa: BLE001 - Redis down: the next tick writes a fresh snapshot
            self.counters["snapshot_errors"] += 1
            self._redis_errors.warning("stats: snapshot not written to Redis (%s); retrying every %.0fs", exc,
                                       cfg.snapshot_every_s, extra={"alert": "stats_redis_unavailable"})
            return
        self.counters["snapshots"] += 1
        log.info("stats: snapshot %d: %d items, %d users at event time %d, %.2fs", n, len(snap.items.ids),
                 len(snap.users.ids), clock, time.perf_counter() - started,
                 extra={"snapshot": n, "skipped": dict(self.skipped), "counters": dict(self.counters)})
