"""`streamtrain demo`: embedded broker + Redis + simulator + daemon, all in one process."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

import streamtrain
from streamtrain.cli.common import add_config_flags, print_json, stop_event_on_signals
from streamtrain.cli.logs import console, live_console
from streamtrain.config import ConfigError, StreamtrainConfig, build_config, env_overrides, flag_overrides, read_yaml

log = logging.getLogger("streamtrain.demo")

def demo_config_file() -> Path:
    """``configs/demo.yaml`` of the checkout this package runs from (what makes a demo show
    something within a minute on a 2-core laptop; the file says why each value).

    Found from the package's location rather than shipped as package data: the demo is a
    from-a-checkout command (``scripts/demo.sh`` sets up an editable install; ``runs/demo``
    lands in the checkout), ``configs/`` is where the checkout keeps its configuration
    beside ``default.yaml``, and the editable install resolves ``streamtrain`` to the
    checkout's own folder, so a worktree on ``PYTHONPATH`` reads its own file too.
    """
    return Path(streamtrain.__file__).resolve().parent.parent / "configs" / "demo.yaml"


def demo_defaults() -> dict[str, Any]:
    """The demo's config layer: the lowest one, under --config, env, services and --set."""
    path = demo_config_file()
    if not path.is_file():
        raise ConfigError([f"{path}: the demo's configuration is missing; `streamtrain demo` runs from a "
                           "source checkout with an editable install (scripts/demo.sh)"])
    return read_yaml(path)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="run everything locally: embedded broker + Redis, simulator, training daemon",
        description="Starts an embedded Kafka-compatible broker and Redis on loopback, produces simulated events "
                    "with a hidden ground truth, and trains on them with the real daemon for --duration seconds. "
                    "Prints a live view and a final summary (model AUC vs the simulator's oracle AUC), and writes "
                    "the run report (<run_dir>/report/index.html, as `streamtrain report` does). "
                    "The demo's run directory (default runs/demo) is wiped at start: the broker is in-memory, so "
                    "old checkpoints' offsets would not match. Its settings are configs/demo.yaml, the lowest layer: "
                    "--config, STREAMTRAIN_* env and --set override them.")
    add_config_flags(parser)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    parser.add_argument("--no-redis", action="store_true", help="do not start Redis (no embedding cold tier)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    parser.add_argument("--no-report", action="store_true", help="do not write the HTML run report at the end")
    parser.set_defaults(func=_demo)


class _AucTracker:
    """Prequential (score-before-train) CTR and CTCVR predictions of exposure rows, with the
    simulator's true probabilities for the same rows: the model and the oracle are judged on
    exactly the same rows (the second half of the trained exposures). Correction rows of
    ``emit_then_correct`` re-emit an exposure already scored: they are not new rows."""

    def __init__(self) -> None:
        self._rows: list[tuple[np.ndarray, ...]] = []  # (sample_id, p_ctr, p_ctcvr, click, convert) per step
        self._truth: dict[int, tuple[float, float]] = {}  # sample_id -> (true pCTR, true pCTCVR)
        self._lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray], result: Any) -> None:
        fresh = ~batch["is_correction"]
        p = result.predictions
        with self._lock:
            self._rows.append((batch["sample_id"][fresh], p.p_ctr[fresh], p.p_ctcvr[fresh],
                               batch["click"][fresh], batch["convert"][fresh]))

    def add_truth(self, truth: dict[str, Any]) -> None:
        """The simulator's truth of one exposure (called from its thread)."""
        from consumers.schema import hash_id

        with self._lock:
            self._truth[hash_id(truth["event_id"])] = (truth["p_ctr"], truth["p_ctr"] * truth["p_cvr"])

    def truth_of(self, ids: np.ndarray) -> np.ndarray:
        """(2, n): the true pCTR and pCTCVR of exposures ``ids``, NaN where not known."""
        with self._lock:
            return np.array([self._truth.get(i, (np.nan, np.nan)) for i in ids.tolist()]).reshape(-1, 2).T

    def summary(self) -> dict[str, Any]:
        """AUCs of the model and of the oracle on the second half of the trained exposures."""
        from monitors.stats import window_auc

        with self._lock:
            if not self._rows:
                return {"auc_rows": 0, "auc": None, "oracle_auc": None, "ctcvr_auc": None, "oracle_ctcvr_auc": None}
            ids, p_ctr, p_ctcvr, click, convert = (np.concatenate(c) for c in zip(*self._rows))
        truth = self.truth_of(ids).T  # (n, 2)
        half = slice(len(ids) // 2, None)
        ctcvr = click * convert

        def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
            value = float(window_auc(scores[half], labels[half]))
            return None if value != value else round(value, 4)

        return {"auc_rows": len(ids) - len(ids) // 2, "auc": auc(p_ctr, click), "oracle_auc": auc(truth[:, 0], click),
                "ctcvr_auc": auc(p_ctcvr, ctcvr), "oracle_ctcvr_auc": auc(truth[:, 1], ctcvr)}


def _demo_config(args: argparse.Namespace, bootstrap: str, redis_url: str | None) -> StreamtrainConfig:
    import os

    user_file = read_yaml(args.config) if args.config else {}
    services = {"kafka": {"bootstrap_servers": bootstrap}, "redis": {"url": redis_url},
                **({"popularity": {"backend": "redis"}} if redis_url else {})}  # the stats worker's numbers
    return build_config(demo_defaults(), user_file, env_overrides(os.environ), services, flag_overrides(args.overrides))


def _demo(args: argparse.Namespace) -> int:
    from streamtrain.cli.demo_oracle import OracleWindows
    from streamtrain.report.curves import ORACLE_FILE, CurveWriter
    from streamtrain.runtime import Daemon, DaemonHooks
    from streamtrain.runtime.live import StatusView
    from streamtrain.services import EmbeddedBroker, EmbeddedRedis, ServiceError
    from streamtrain.services.topics import create_topics
    from streamtrain.simulator import KafkaSink, run_simulation

    stop = stop_event_on_signals()
    probe = _demo_config(args, "127.0.0.1:0", None)  # validate flags before starting anything
    shutil.rmtree(probe.run_dir, ignore_errors=True)
    with EmbeddedBroker() as broker:
        redis = None
        if not args.no_redis:
            try:
                redis = EmbeddedRedis().start()
            except ServiceError as exc:
                log.warning("continuing without Redis: %s", exc)
        try:
            config = _demo_config(args, broker.bootstrap_servers, redis.url if redis else None)
            kafka = config.kafka
            create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
            tracker = _AucTracker()
            sim_stats: dict[str, Any] = {}
            sim_stop = threading.Event()
            # The oracle on the AUC monitor's windows, for the report (<run_dir>/oracle.jsonl).
            oracle = OracleWindows(config.monitors.auc.window, CurveWriter(config.run_dir / ORACLE_FILE, "oracle"),
                                   tracker.truth_of)

            def simulate() -> None:
                stats = run_simulation(config.simulator, KafkaSink(kafka.bootstrap_servers, kafka.topic), stop=sim_stop,
                                       truth_sink=tracker.add_truth)
                sim_stats.update(stats.summary())

            def on_trained(batch: dict[str, np.ndarray], result: Any) -> None:
                tracker(batch, result)
                oracle(batch, result)

            daemon = Daemon(config, stop=stop, hooks=DaemonHooks(on_trained=on_trained))
            stats_worker = _start_stats_worker(config) if redis is not None else None
            producer = threading.Thread(target=simulate, name="simulator", daemon=True)
            producer.start()
            timer = threading.Timer(args.duration, stop.set)
            timer.start()
            view = StatusView(daemon.status, console=live_console()).start()
            try:
                summary = daemon.run()
            finally:
                view.stop()
                timer.cancel()
                sim_stop.set()
                producer.join(timeout=30)
                if stats_worker is not None:
                    stats_worker.stop(timeout_s=15.0)
            in_redis = _redis_report(redis.url, config.redis.key_prefix, daemon.status().counters) if redis else None
        finally:
            if redis is not None:
                redis.stop()
    status = daemon.status()
    result = {
        "events": sim_stats.get("events", 0),
        "events_consumed": status.counters.get("messages", 0),
        "dlq": sum(v for k, v in status.counters.items() if k.startswith("dlq.")),
        "samples": summary.samples_trained,
        "samples_per_s": round(summary.samples_trained / max(args.duration, 1e-9), 1),
        **tracker.summary(),
        "checkpoints": summary.checkpoints,
        "published_versions": summary.published_versions,
        "gate": summary.gate,
        "run_dir": str(config.run_dir),
        **{k: v for k, v in dataclasses.asdict(summary).items() if k in ("steps", "checkpoint_failures")},
        "report": None if args.no_report else _write_report(config.run_dir),
        **({"redis": in_redis} if in_redis is not None else {}),
    }
    if args.json:
        print_json(result)
    else:
        from streamtrain.cli.demo_summary import summary_table

        console().print()
        console().print(summary_table(result, duration_s=args.duration, checkpoints=str(config.checkpoints.root),
                                      published=str(config.published_root)))
    return 0


def _write_report(run_dir: Path) -> str | None:
    """The run report, drawn once the services are down (a few seconds of matplotlib)."""
    from streamtrain.report.page import NoHistoryError, write_report

    log.info("drawing the run report (streamtrain report %s)", run_dir)
    try:
        page = write_report(run_dir)
    except NoHistoryError as exc:
        log.warning("no report: %s", exc)
        return None
    log.info("report written to %s", page)
    return str(page)
def _start_stats_worker(config: StreamtrainConfig) -> Any:
    """`streamtrain stats` beside the daemon, on the demo's effective config (a process of
    its own: Faust runs its own event loop and signal handling); stopped by the caller."""
    import yaml

    from streamtrain.services.process import ManagedProcess

    path = config.run_dir / "stats.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict()))
    worker = ManagedProcess("stats worker", [sys.executable, "-m", "streamtrain", "--log-format", "json", "stats",
                                             "--config", str(path)], config.run_dir / "stats.log")
    worker.start(ready=lambda: True, timeout_s=5.0)
    return worker


def _redis_report(url: str, prefix: str, counters: dict[str, int]) -> dict[str, Any]:
    """What went to Redis: the stats snapshot, the served versions, the keys under the prefix,
    and where the joiner's popularity came from."""
    import redis as redis_client

    from consumers.stats_store import StatsKeys, read_snapshot
    from streamtrain.runtime.serving import ServingKeys

    client = redis_client.Redis.from_url(url)
    snap = read_snapshot(client, StatsKeys(prefix))
    versions = [v.decode() for v in client.zrange(ServingKeys(prefix).versions, 0, -1)]
    current = client.get(ServingKeys(prefix).current)
    return {
        "keys": sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000)),
        "stats_snapshot": None if snap is None else {"items": len(snap.items.ids), "users": len(snap.users.ids),
                                                     "events": int(snap.info.get("applied", 0)),
                                                     "skipped": snap.info.get("skipped")},
        "serving_current": None if current is None else current.decode(),
        "serving_versions": versions,
        "popularity_source": "redis" if counters.get("popularity.source_redis") else "local",
        "popularity_fetches": counters.get("popularity.fetches", 0),
    }
