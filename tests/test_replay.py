"""`streamtrain replay`: real interaction logs as events of the contract, and a daemon that
trains all of one and exits (the walls a new user hit: old timestamps dead-lettered in
silence, a finite log that never finished)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consumers.config import DecoderConfig
from consumers.decode import EventDecoder
from streamtrain.replay import Columns, ReplayRules, build_events, read_csv, read_movielens, read_parquet, week_shift
from streamtrain.replay.events import WEEK_MS
from tests.daemon_harness import final_state, start_daemon, write_config

T1997 = 874_965_758  # seconds: 1997-09-22, as in MovieLens 100k


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamtrain", *args], capture_output=True, text=True, timeout=300)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(orjson.loads(line)["value"]) for line in path.read_bytes().splitlines()]


def test_a_movielens_file_round_trips_into_the_expected_events(tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text(f"7\t100\t5\t{T1997}\n8\t200\t2\t{T1997 + 1}\n7\t300\t4\t{T1997}\n")
    out = tmp_path / "events.jsonl"
    done = _cli("replay", str(data), "--format", "movielens", "--convert-threshold", "5", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout.splitlines()[-1])
    shift = summary["time_shift_days"] * 86_400_000
    assert shift % WEEK_MS == 0 and T1997 * 1000 + shift >= DecoderConfig().min_ts_ms  # moved into the bounds by whole weeks
    t = T1997 * 1000 + shift
    page = f"u.data:7:{T1997}"  # user 7's two ratings in that second are one request
    expected = [
        {"event_id": "u.data:1:x", "type": "exposure", "ts": t, "user_id": "7", "item_id": "100", "request_id": page},
        {"event_id": "u.data:3:x", "type": "exposure", "ts": t, "user_id": "7", "item_id": "300", "request_id": page},
        {"event_id": "u.data:2:x", "type": "exposure", "ts": t + 1000, "user_id": "8", "item_id": "200",
         "request_id": f"u.data:8:{T1997 + 1}"},
        {"event_id": "u.data:1:c", "type": "click", "ts": t + 1000, "user_id": "7", "item_id": "100", "request_id": page},
        {"event_id": "u.data:3:c", "type": "click", "ts": t + 1000, "user_id": "7", "item_id": "300", "request_id": page},
        {"event_id": "u.data:1:v", "type": "convert", "ts": t + 3000, "user_id": "7", "item_id": "100", "request_id": page},
    ]
    assert _jsonl(out) == expected
    assert (summary["rows"], summary["exposures"], summary["clicks"], summary["converts"]) == (3, 3, 2, 1)
    keys = [orjson.loads(line)["key"] for line in out.read_bytes().splitlines()]
    assert keys == ["7", "7", "8", "7", "7", "7"]  # keyed by user (DESIGN §3)
    # Every event passes the contract as the daemon's default decoder checks it.
    values = [orjson.dumps(e) for e in expected]
    decoded = EventDecoder(DecoderConfig(), (), ()).decode(values, [0] * 6, list(range(6)), [k.encode() for k in keys])
    assert decoded.rejections == [] and len(decoded.events) == 6


def test_the_dat_and_csv_movielens_layouts_read_the_same(tmp_path: Path) -> None:
    dat, csv = tmp_path / "ratings.dat", tmp_path / "ratings.csv"
    dat.write_text(f"1::10::4::{T1997}\n2::20::3.5::{T1997 + 60}\n")
    csv.write_text(f"userId,movieId,rating,timestamp\n1,10,4.0,{T1997}\n2,20,3.5,{T1997 + 60}\n")
    a, b = read_movielens(dat), read_movielens(csv)
    for field in ("user", "item", "ts_ms", "rating"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.line.tolist() == [1, 2] and b.line.tolist() == [2, 3]  # file lines: the csv has a header


def test_a_malformed_line_stops_the_replay_with_its_line_number(tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text(f"1\t10\t5\t{T1997}\n2\t20\n3\t30\t4\t{T1997 + 5}\n4\t40\tfive\t{T1997 + 9}\n")
    done = _cli("replay", str(data), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2
    assert f"{data}:2: expected 4 fields, got 2" in done.stderr and "--max-bad-rows" in done.stderr
    done = _cli("replay", str(data), "--out", str(tmp_path / "o.jsonl"), "--max-bad-rows", "1")
    assert done.returncode == 2 and f"{data}:4: rating is not a number" in done.stderr
    done = _cli("replay", str(data), "--out", str(tmp_path / "o.jsonl"), "--max-bad-rows", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.splitlines()[-1])["bad_rows"] == 2
    assert [e["event_id"] for e in _jsonl(tmp_path / "o.jsonl") if e["type"] == "exposure"] == ["u.data:1:x", "u.data:3:x"]


def test_csv_and_parquet_with_mapped_columns(tmp_path: Path) -> None:
    columns = Columns(user="uid", item="sku", ts="when_ms", rating=None, ts_unit="ms")
    rows = {"uid": ["a", "b"], "sku": ["x", "y"], "when_ms": [1_700_000_000_000, 1_700_000_000_500]}
    (tmp_path / "log.csv").write_text("uid;sku;when_ms;other\na;x;1700000000000;1\nb;y;1700000000500;2\n")
    pq.write_table(pa.table(rows), tmp_path / "log.parquet")
    for got in (read_csv(tmp_path / "log.csv", columns, delimiter=";"), read_parquet(tmp_path / "log.parquet", columns)):
        assert got.user.tolist() == ["a", "b"] and got.item.tolist() == ["x", "y"]
        assert got.ts_ms.tolist() == rows["when_ms"] and np.isnan(got.rating).all()
        events = list(build_events(got, ReplayRules(click_threshold=None)))
        assert [e.kind for e in events] == ["exposure", "exposure"]


def test_week_shift_keeps_hour_and_weekday() -> None:
    cfg = DecoderConfig()
    first = T1997 * 1000
    shift = week_shift(first, first + 86_400_000, cfg.min_ts_ms, cfg.max_ts_ms)
    assert shift > 0 and shift % WEEK_MS == 0 and first + shift >= cfg.min_ts_ms
    before = datetime.fromtimestamp(first / 1000, tz=timezone.utc)
    after = datetime.fromtimestamp((first + shift) / 1000, tz=timezone.utc)
    assert (before.hour, before.minute, before.weekday()) == (after.hour, after.minute, after.weekday())
    assert week_shift(cfg.min_ts_ms, cfg.min_ts_ms + 1, cfg.min_ts_ms, cfg.max_ts_ms) == 0


def _movielens(path: Path, users: int = 40, items: int = 60, ratings: int = 900) -> int:
    """A small MovieLens-style log in 1997; returns its number of ratings."""
    rng = np.random.default_rng(0)
    ts = T1997 + np.sort(rng.integers(0, 3 * 86_400, ratings))
    pairs = {(int(u), int(i)): int(t) for u, i, t in zip(rng.integers(1, users, ratings), rng.integers(1, items, ratings), ts)}
    lines = [f"{u}\t{i}\t{int(rng.integers(1, 6))}\t{t}" for (u, i), t in sorted(pairs.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


@pytest.mark.integration
@pytest.mark.slow
def test_a_replayed_1990s_log_is_trained_to_its_last_sample_and_the_daemon_exits(
    broker: Any, unique_name: str, tmp_path: Path
) -> None:
    rows = _movielens(tmp_path / "u.data")
    broker.create_topics([unique_name, f"{unique_name}.dlq"], partitions=2)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap_servers, unique_name, tmp_path / "run",
                          trainer={"batch_size": 64})
    done = _cli("replay", str(tmp_path / "u.data"), "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.splitlines()[-1])["end_of_input"] is True
    daemon = start_daemon(config, log_path=tmp_path / "daemon.log")  # no stop point: the log's end stops it
    assert daemon.wait(timeout=240) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    state = final_state(tmp_path / "run")
    assert state.components["trainer"]["samples"] == rows  # every exposure, the last shorter batch included
    counters = state.components["pipeline"]["dlq_counts"]
    assert counters["bad_ts"] == 0 and sum(counters.values()) == 0, counters


@pytest.mark.integration
@pytest.mark.slow
def test_a_poll_mostly_dead_lettered_is_said_loudly(broker: Any, unique_name: str, tmp_path: Path) -> None:
    _movielens(tmp_path / "u.data")
    broker.create_topics([unique_name, f"{unique_name}.dlq"], partitions=2)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap_servers, unique_name, tmp_path / "run")
    done = _cli("replay", str(tmp_path / "u.data"), "--config", str(config), "--time-shift", "none")
    assert done.returncode == 0 and "decoder.min_ts_ms" in done.stderr  # the replay warns first
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "streamtrain", "--log-format", "json", "run", "--config", str(config)],
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    assert daemon.wait(timeout=240) == 0, log.read_text()[-3000:]
    warnings = [r for r in map(orjson.loads, log.read_bytes().splitlines()) if r.get("alert") == "dlq_majority"]
    assert warnings and warnings[0]["reason"] == "bad_ts" and "went to the DLQ" in warnings[0]["msg"]
    assert final_state(tmp_path / "run").components["trainer"]["samples"] == 0
