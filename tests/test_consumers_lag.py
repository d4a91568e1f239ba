"""Consumer lag: end of partition minus the consumer's position, against the real broker.

The embedded broker answers ListOffsets with an end offset below what it holds (it
under-reports: e.g. 1 after 1,000 messages), while the high watermark carried by its
fetch responses is right. ``KafkaSource.lag`` reads the fetch-response watermark
(librdkafka's cached one), which is what Apache Kafka reports too; these tests pin
that choice down on the real broker.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Producer

from consumers.config import KafkaSourceConfig
from consumers.source import KafkaSource
from test_consumers_kafka import produce_to_partitions

pytestmark = pytest.mark.integration


def test_lag_counts_what_is_left_in_each_partition(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name], partitions=2)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    sizes = {0: 700, 1: 300}
    produce_to_partitions(producer, unique_name, {p: [b"m%d" % i for i in range(n)] for p, n in sizes.items()})
    assert producer.flush(30) == 0
    source = KafkaSource(KafkaSourceConfig(bootstrap_servers=broker.bootstrap_servers, topic=unique_name,
                                           group_id=unique_name, mode="assign"))
    try:
        consumed: dict[int, int] = dict.fromkeys(sizes, 0)
        deadline = time.monotonic() + 60
        while sum(consumed.values()) < 200 and time.monotonic() < deadline:
            batch = source.consume(200 - sum(consumed.values()), 1.0)
            for p in batch.partitions:
                consumed[p] += 1
        assert sum(consumed.values()) == 200
        # A partition's end is known once a fetch response for it arrived (librdkafka's
        # fetcher runs in the background); before that it is left out, never reported as 0.
        lag = source.lag()
        while set(lag) != set(sizes) and time.monotonic() < deadline:
            time.sleep(0.1)
            lag = source.lag()
        assert lag == {p: sizes[p] - consumed[p] for p in sizes}, (lag, consumed)
    finally:
        source.close()
