"""Redis as the cold tier: one string key per evicted embedding key.

Key ``<key_prefix><id>`` holds the row's binary record (:class:`RecordCodec`). Batches go
through one pipeline round trip per ``chunk`` keys. Reads use ``GETDEL``: a key that
comes back lives in the table again, so Redis should not keep a copy that will go stale.

Failure policy (fail open): the tier is a cache of rows the table chose to forget. If
Redis is unreachable, a spill is dropped and a fetch reads as a miss -- the key restarts
from its initial row -- and ``errors`` counts it; training never stops for the cold tier.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis


class RedisColdTier:
    def __init__(self, client: redis.Redis, key_prefix: str, chunk: int = 10_000) -> None:
        self.client = client
        self.key_prefix = key_prefix  # include the table name: tables must not share keys
        self.chunk = chunk  # commands per pipeline: bounds the reply buffered per round trip
        self.errors = 0  # operations that failed and were skipped (see module doc)

    def _name(self, key: int) -> str:
        return f"{self.key_prefix}{key}"

    def put(self, keys: Sequence[int], records: Sequence[bytes]) -> None:
        try:
            for start in range(0, len(keys), self.chunk):
                part = range(start, min(start + self.chunk, len(keys)))
                self.client.mset({self._name(keys[i]): records[i] for i in part})
        except redis.RedisError:
            self.errors += 1

    def take(self, keys: Sequence[int]) -> list[bytes | None]:
        found: list[bytes | None] = []
        try:
            for start in range(0, len(keys), self.chunk):
                pipe = self.client.pipeline(transaction=False)
                for key in keys[start : start + self.chunk]:
                    pipe.getdel(self._name(key))
                found.extend(pipe.execute())
        except redis.RedisError:
            self.errors += 1
            return [None] * len(keys)
        return found
