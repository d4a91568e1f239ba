"""Stream statistics: events/s of the stats worker and the Redis snapshot time, beside baselines.

    python -m bench.stats [--quick] [--events N] [--items N] [--repeats R]

Part 1, throughput. An embedded broker and Redis; N events of a synthetic world (requests of
5 exposures from 20,000 users over 50,000 popularity-skewed items, 5 % clicked, 10 % of
clicks converted) produced to a 2-partition topic. Timed on the same messages:

* **worker**: the real ``streamtrain stats`` process (Faust consumer, EventDecoder, the
  exactly-once cursor, one changelog record per changed row and step, a snapshot every
  2 s). Its rate is read off its own snapshots (messages counted / wall time between the
  first snapshot that counted anything and the one that counted everything), so start-up
  (group join, table recovery) is left out and reported apart;
* **faust no-op** (baseline): a Faust agent on the same topic that only counts the
  messages it is handed (``take_events(2000)``, as the worker): Faust's own ceiling here;
* **core**: the same decode + ``PartialCounts.apply`` of items and users in process, no
  Kafka, no changelog, in steps of 2,000 messages: the ceiling of the worker's own code.

Part 2, one snapshot of M items (and M/5 users), each seen in both partitions (2 partial
rows per id, as in the worker), written to the real Redis:

* **snapshot**: merge the partials, rank, quantile and priors (``compute_s``), then
  ``write_snapshot`` — per-id hashes for point lookups plus the bulk parts — (``write_s``);
  ``snapshot_s`` is their sum, what one worker tick costs;
* **bulk only** (baseline): the same records as the bulk parts alone (two SETs per kind and
  the meta): the floor of any snapshot with this layout; the per-id hashes are the rest;
* ``fetch_s``: ``read_snapshot`` + ``StatsCache``, what the daemon's ``sync()`` pays.

Best of ``--repeats`` for the in-process parts (the machine is shared: load only adds
time); the worker and the no-op agent run once each. The last line is one JSON object.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import yaml
from confluent_kafka import Producer

from bench.common import announce_quick, interleaved, machine_info, parser, print_result, rounded, timed
from consumers.config import DecoderConfig, StatsConfig
from consumers.decode import EventDecoder
from consumers.hashing import mix_ids
from consumers.popularity import StatsCache
from consumers.schema import Action, hash_id
from consumers.stats_state import PartialCounts
from consumers.stats_store import FIELDS, Priors, StatsKeys, build_snapshot, read_snapshot, write_snapshot
from consumers.testing import StreamSpec, synthetic_events
from streamtrain.services import EmbeddedBroker, EmbeddedRedis
from streamtrain.services.topics import create_topics

PARTITIONS = 2
STEP = 2000
PRIORS = Priors(20.0, 0.05, 20.0, 0.1)


def messages(n_events: int) -> list[tuple[int, bytes, bytes]]:
    spec = StreamSpec(exposures=int(n_events / 1.055), users=20_000, items=50_000, request_gap_ms=100,
                      click_rate=0.05, convert_rate=0.10)
    return [(hash_id(e["user_id"]) % PARTITIONS, e["user_id"].encode(), orjson.dumps(e)) for e in synthetic_events(spec)]


def time_core(batch: list[tuple[int, bytes, bytes]]) -> float:
    """Decode + count, in process, as the worker's steps do (per partition, offsets ascending)."""
    decoder, config = EventDecoder(DecoderConfig(), (), ()), StatsConfig()
    counts = [PartialCounts(config), PartialCounts(config)]
    offsets = [0] * PARTITIONS
    started = time.perf_counter()
    for start in range(0, len(batch), STEP):
        step = batch[start:start + STEP]
        parts, keys, values = zip(*step)
        numbered = []
        for p in parts:
            numbered.append(offsets[p])
            offsets[p] += 1
        ev = decoder.decode(list(values), list(parts), numbered, list(keys)).events
        for p in range(PARTITIONS):
            mine = ev.partition == p
            for table, ids in zip(counts, (ev.item, ev.user)):
                table.apply(p, ev.offset[mine], ids[mine], ev.etype[mine], ev.ts[mine])
    return time.perf_counter() - started


def produce(bootstrap: str, batch: list[tuple[int, bytes, bytes]]) -> str:
    topic = f"bench-stats-{time.time_ns()}"
    create_topics(bootstrap, [topic], PARTITIONS)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "queue.buffering.max.messages": 1_000_000})
    for partition, key, value in batch:
        while True:
            try:
                producer.produce(topic, key=key, value=value, partition=partition)
                break
            except BufferError:
                producer.poll(0.01)
    assert producer.flush(120) == 0
    return topic


def follow(proc: subprocess.Popen[bytes], counted: Any, total: int, log: Path) -> dict[str, float]:
    """Poll ``counted()`` (messages handled so far) until ``total``: the rate between the first
    reading above zero and the last, and how long the process took to get there."""
    started, first = time.monotonic(), None
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited:\n" + log.read_text()[-2000:])
            now, n = time.monotonic(), counted()
            if n and first is None:
                first = (now, n)
            if n >= total:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert first is not None
    return {"events_per_s": (n - first[1]) / max(now - first[0], 1e-9), "startup_s": first[0] - started}


def time_noop_agent(bootstrap: str, batch: list[tuple[int, bytes, bytes]], workdir: Path) -> dict[str, float]:
    """The baseline: a Faust agent that only counts (this module run with ``--noop-agent``)."""
    topic, out = produce(bootstrap, batch), workdir / "noop.count"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    proc = subprocess.Popen([sys.executable, "-m", "bench.stats", "--noop-agent", bootstrap, topic, str(out)],
                            stdout=open(workdir / "noop.log", "wb"), stderr=subprocess.STDOUT, env=env)
    return follow(proc, lambda: int(out.read_text() or 0) if out.exists() else 0, len(batch), workdir / "noop.log")


def run_noop_agent(bootstrap: str, topic: str, out: Path) -> None:
    import faust

    app = faust.App(f"noop-{topic}", broker=f"kafka://{bootstrap}", store="memory://", autodiscover=False,
                    web_enabled=False, web_bind="127.0.0.1", web_host="127.0.0.1", broker_session_timeout=6.0,
                    topic_partitions=PARTITIONS, consumer_auto_offset_reset="earliest", datadir=str(out.parent / "noop"))
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = [0]

    async def count(stream: Any) -> None:
        async for events in stream.take_events(STEP, within=0.2):
            seen[0] += len(events)

    async def report() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(str(seen[0]))
        tmp.replace(out)

    app.agent(source, name="noop")(count)
    app.timer(0.1)(report)
    worker = faust.Worker(app, quiet=True, override_logging=False, redirect_stdouts=False)
    worker.spinner = None
    worker.execute_from_commandline()


def time_worker(bootstrap: str, redis_url: str, batch: list[tuple[int, bytes, bytes]], workdir: Path) -> dict[str, float]:
    """Produce, start the real worker, follow its snapshots until every message is counted."""
    topic, prefix = produce(bootstrap, batch), "bench-stats:"
    config = workdir / "stats.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(workdir), "kafka": {"bootstrap_servers": bootstrap, "topic": topic},
                                      "redis": {"url": redis_url, "key_prefix": prefix},
                                      "stats": {"app_id": topic, "snapshot_every_s": 2.0}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    proc = subprocess.Popen([sys.executable, "-m", "streamtrain", "--log-format", "json", "stats", "--config",
                             str(config)], stdout=open(workdir / "worker.log", "wb"), stderr=subprocess.STDOUT, env=env)
    client, keys = redis.Redis.from_url(redis_url), StatsKeys(prefix)

    def counted() -> int:
        snap = read_snapshot(client, keys)
        return 0 if snap is None else int(snap.info["messages"])

    return follow(proc, counted, len(batch), workdir / "worker.log")


def filled_counts(items: int, users: int, seed: int = 0) -> tuple[PartialCounts, PartialCounts]:
    """Every item and user seen in both partitions: exposures over an hour, 5 % clicked."""
    rng = np.random.default_rng(seed)
    config = StatsConfig()
    tables = (PartialCounts(config, initial=2 * items + 16), PartialCounts(config, initial=2 * users + 16))
    t0 = 1_767_225_600_000
    for table, n in zip(tables, (items, users)):
        ids = mix_ids(np.arange(n, dtype=np.int64), np.full(n, seed, np.int64))  # scattered like hash_id's
        for partition in range(PARTITIONS):
            for start in range(0, n, 200_000):
                chunk = ids[start:start + 200_000]
                etype = np.where(rng.random(len(chunk)) < 0.05, Action.CLICK, Action.EXPOSURE).astype(np.int8)
                ts = t0 + rng.integers(0, 3_600_000, len(chunk))
                table.apply(partition, np.arange(start, start + len(chunk)), chunk, etype, ts)
    return tables


def bulk_only(client: redis.Redis, keys: StatsKeys, snap: Any, ttl_s: int) -> None:
    """The baseline: the records as bulk parts only (what the per-id hashes come on top of)."""
    pipe = client.pipeline(transaction=False)
    for kind, table in (("item", snap.items), ("user", snap.users)):
        pipe.set(keys.ids(0, kind, 0), np.ascontiguousarray(table.ids, "<i8").tobytes(), ex=ttl_s)
        pipe.set(keys.values(0, kind, 0), np.ascontiguousarray(table.values, "<f4").tobytes(), ex=ttl_s)
    pipe.hset(keys.meta(0), mapping={"items": len(snap.items.ids), "users": len(snap.users.ids)})
    pipe.execute()


def main() -> None:
    if sys.argv[1:2] == ["--noop-agent"]:  # the baseline's own process
        run_noop_agent(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        return
    cli = parser(__doc__, "20k events, 100k items, 1 repeat (about a minute)")
    cli.add_argument("--events", type=int, default=None, help="events for the throughput part (default 200k)")
    cli.add_argument("--items", type=int, default=None, help="items in the snapshot (default 1M)")
    cli.add_argument("--repeats", type=int, default=None, help="rounds of the in-process parts (default 3)")
    args = cli.parse_args()
    n_events = args.events or (20_000 if args.quick else 200_000)
    n_items = args.items or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        announce_quick({"events": n_events, "items": n_items, "repeats": repeats})
    machine = machine_info()
    batch = messages(n_events)
    core_s = min(interleaved({"core": timed(lambda _: time_core(batch))}, repeats)["core"])
    print(f"core: {len(batch) / core_s:,.0f} events/s ({len(batch)} messages, best of {repeats})", flush=True)
    with EmbeddedBroker() as broker, EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        noop = time_noop_agent(broker.bootstrap_servers, batch, Path(tmp))
        print(f"faust no-op agent: {noop['events_per_s']:,.0f} events/s after a {noop['startup_s']:.1f} s start",
              flush=True)
        worker = time_worker(broker.bootstrap_servers, server.url, batch, Path(tmp))
        print(f"worker: {worker['events_per_s']:,.0f} events/s after a {worker['startup_s']:.1f} s start", flush=True)

        items_table, users_table = filled_counts(n_items, n_items // 5)
        client, keys = redis.Redis.from_url(server.url), StatsKeys("bench-snapshot:")
        clock = max(items_table.max_clock or 0, users_table.max_clock or 0)
        held: dict[str, Any] = {}

        def compute(_: int) -> None:
            held["snap"] = build_snapshot(items_table.merged(clock), users_table.merged(clock), PRIORS)

        def fetch(_: int) -> None:
            snap = read_snapshot(client, keys)
            assert snap is not None and len(snap.items.ids) == n_items
            StatsCache.from_snapshot(snap, 0.8)

        compute(0)
        runs = interleaved({
            "compute": timed(compute),
            "write": timed(lambda _: write_snapshot(client, keys, held["snap"], ttl_s=600, grace_s=5)),
            "bulk_only": timed(lambda _: bulk_only(client, keys, held["snap"], ttl_s=600)),
            "fetch": timed(fetch),
        }, repeats)
        best = {name: min(values) for name, values in runs.items()}
        print(f"snapshot of {n_items:,} items + {n_items // 5:,} users: compute {best['compute']:.2f} s + write "
              f"{best['write']:.2f} s = {best['compute'] + best['write']:.2f} s (bulk parts alone: "
              f"{best['bulk_only']:.2f} s); fetch + cache {best['fetch']:.2f} s; "
              f"{client.info('memory')['used_memory'] / 2**20:,.0f} MiB in Redis", flush=True)
    print_result({
        "benchmark": "stats", "events": len(batch), "events_per_s": round(worker["events_per_s"]),
        "faust_noop_events_per_s": round(noop["events_per_s"]), "ratio_to_noop": rounded(worker["events_per_s"] /
                                                                                     noop["events_per_s"]),
        "core_events_per_s": round(len(batch) / core_s), "worker_startup_s": rounded(worker["startup_s"], 2),
        "items": n_items, "users": n_items // 5, "record_fields": len(FIELDS),
        "snapshot_s": rounded(best["compute"] + best["write"]), "compute_s": rounded(best["compute"]),
        "write_s": rounded(best["write"]), "bulk_only_write_s": rounded(best["bulk_only"]),
        "fetch_s": rounded(best["fetch"]), "repeats": repeats, "machine": machine,
    })


if __name__ == "__main__":
    main()
