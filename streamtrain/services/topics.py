"""Topic creation that works the same against the embedded broker and Apache Kafka."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from streamtrain.services.process import ServiceError


def create_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    client_overrides: Mapping[str, object] | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Create topics (existing ones are left as they are) and wait until metadata shows them."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(client_overrides or {})})
    wanted = list(names)
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in wanted])
    for name, fut in futures.items():
        try:
            fut.result(timeout_s)
        except Exception as exc:  # noqa: BLE001 - KafkaException carries the broker's error
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise ServiceError(f"creating topic {name!r} on {bootstrap_servers} failed: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=5)
        if all(n in meta.topics and meta.topics[n].partitions for n in wanted):
            return
        time.sleep(0.1)
    raise ServiceError(f"topics {wanted} did not appear in metadata of {bootstrap_servers} within {timeout_s}s")
