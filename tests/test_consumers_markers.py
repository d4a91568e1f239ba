"""End-of-input markers through the real broker: read, recorded, never delivered as events."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Producer

from consumers.config import KafkaSourceConfig
from consumers.markers import produce_end_of_input
from consumers.source import KafkaSource
from test_consumers_kafka import produce_to_partitions

pytestmark = pytest.mark.integration


def test_the_source_reports_each_partitions_marker_and_skips_it(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name], partitions=2)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    sizes = {0: 5, 1: 3}
    values: dict[int, list[bytes | None]] = {p: [b'{"n": %d}' % i for i in range(n)] for p, n in sizes.items()}
    values[0].append(None)  # a tombstone is not a marker
    produce_to_partitions(producer, unique_name, values)
    produce_end_of_input(producer, unique_name, sorted(sizes))
    assert producer.flush(30) == 0
    source = KafkaSource(KafkaSourceConfig(bootstrap_servers=broker.bootstrap_servers, topic=unique_name,
                                           group_id=unique_name, mode="assign"))
    try:
        values: list[bytes | None] = []
        ended: list[int] = []
        deadline = time.monotonic() + 60
        while len(ended) < 2 and time.monotonic() < deadline:
            batch = source.consume(100, 0.5)
            values += batch.values
            ended += batch.ended
        assert sorted(ended) == [0, 1]
        assert len(values) == 5 + 3 + 1 and values.count(None) == 1  # data and the tombstone, no marker
        assert source.positions()[unique_name] == {0: 7, 1: 4}  # past each marker
    finally:
        source.close()
