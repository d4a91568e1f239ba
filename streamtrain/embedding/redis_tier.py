"""Redis as the cold tier: one hash per evicted embedding key, one field per version.

Layout (every name starts with ``key_prefix``, which includes the table name):

- ``<prefix><id>``: hash {decimal step: record} -- the row's binary records
  (:class:`RecordCodec`) by the table step that spilled them (see ``cold_tier`` for why).
- ``<prefix>gc``: sorted set of ids whose hash may hold garbage, scored by a lower bound of
  the key's second-oldest version -- the smallest ``retain_from`` step at which something
  of it can go. ``retain_from`` therefore visits only keys with garbage (plus keys written
  once since the last visit), never the whole keyspace.

Each command touches one key (scripts declare theirs), batches go through one pipeline
round trip per ``chunk`` keys, and a read transfers one record per key, not every version:
a server-side script picks it. Nothing expires: a wall-clock TTL would drop records on a
schedule a replay cannot repeat (keep the server's default ``maxmemory-policy noeviction`` for
the same reason).

Failure policy (fail open): the tier is a cache of rows the table chose to forget. If
Redis is unreachable, a spill is dropped and a fetch reads as a miss -- the key restarts
from its initial row -- and ``errors`` counts it; training never stops for the cold tier.
Exact replays are not promised across such failures: a lost spill makes a later read see
an older version or none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis

# KEYS[1]: a key's hash; ARGV[1]: the read step. The record of the largest version <= step, or nil.
_READ_AT = """
local step = tonumber(ARGV[1])
local best, best_field = nil, nil
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local v = tonumber(field)
  if v <= step and (best == nil or v > best) then best, best_field = v, field end
end
if best_field == nil then return false end
return redis.call('HGET', KEYS[1], best_field)
"""

# KEYS[1]: a key's hash; ARGV[1]: the retain step. Deletes the versions older than the newest
# version <= step; returns the second-oldest version left (next step at which GC can act), or nil.
_COLLECT = """
local step = tonumber(ARGV[1])
local fields = redis.call('HKEYS', KEYS[1])
local keep = nil
for _, field in ipairs(fields) do
  local v = tonumber(field)
  if v <= step and (keep == nil or v > keep) then keep = v end
end
local left = {}
for _, field in ipairs(fields) do
  local v = tonumber(field)
  if keep ~= nil and v < keep then redis.call('HDEL', KEYS[1], field) else left[#left + 1] = v end
end
if #left < 2 then return false end
table.sort(left)
return left[2]
"""


class RedisColdTier:
    """See the module docstring. Not thread-safe: one table drives it."""

    def __init__(self, client: redis.Redis, key_prefix: str, chunk: int = 10_000) -> None:
        self.client = client
        self.key_prefix = key_prefix  # include the table name: tables must not share keys
        self.chunk = chunk  # keys per pipeline: bounds the reply buffered per round trip
        self.errors = 0  # operations that failed and were skipped (see module doc)
        self._gc_key = f"{key_prefix}gc"  # ids are decimal: no clash with <prefix><id>
        self._read_at = client.register_script(_READ_AT)
        self._collect = client.register_script(_COLLECT)

    def _name(self, key: int | bytes) -> str:
        return f"{self.key_prefix}{key.decode() if isinstance(key, bytes) else key}"

    def put(self, keys: Sequence[int], records: Sequence[bytes], step: int) -> None:
        try:
            for start in range(0, len(keys), self.chunk):
                part = range(start, min(start + self.chunk, len(keys)))
                pipe = self.client.pipeline(transaction=False)
                for i in part:
                    pipe.hset(self._name(keys[i]), str(step), records[i])
                # LT keeps an existing smaller score: the score stays <= the second-oldest version.
                pipe.zadd(self._gc_key, {str(keys[i]): step for i in part}, lt=True)
                pipe.execute()
        except redis.RedisError:
            self.errors += 1

    def get(self, keys: Sequence[int], step: int) -> list[bytes | None]:
        found: list[bytes | None] = []
        try:
            for start in range(0, len(keys), self.chunk):
                pipe = self.client.pipeline(transaction=False)
                for key in keys[start : start + self.chunk]:
                    self._read_at(keys=[self._name(key)], args=[step], client=pipe)
                found.extend(pipe.execute())
        except redis.RedisError:
            self.errors += 1
            return [None] * len(keys)
        return found

    def retain_from(self, step: int) -> None:
        """Collect every key whose gc score is <= step. Each visited key leaves with at most
        one version <= step, so its new score is > step (or it leaves the set): the loop ends."""
        try:
            while ids := self.client.zrangebyscore(self._gc_key, "-inf", step, start=0, num=self.chunk):
                pipe = self.client.pipeline(transaction=False)
                for member in ids:
                    self._collect(keys=[self._name(member)], args=[step], client=pipe)
                second_oldest = pipe.execute()
                done = [m for m, nxt in zip(ids, second_oldest) if nxt is None]
                later = {m: nxt for m, nxt in zip(ids, second_oldest) if nxt is not None}
                pipe = self.client.pipeline(transaction=False)
                if done:
                    pipe.zrem(self._gc_key, *done)
                if later:
                    pipe.zadd(self._gc_key, later)  # exact scores, all > step
                pipe.execute()
        except redis.RedisError:
            self.errors += 1


def redis_cold_tiers(url: str | None, key_prefix: str) -> Callable[[str], RedisColdTier | None]:
    """Table name -> its cold tier under ``<key_prefix>emb:<name>:`` on one shared client,
    or no tier at all when ``url`` is unset (the tables then never spill)."""
    if not url:
        return lambda name: None
    client = redis.Redis.from_url(url)
    return lambda name: RedisColdTier(client, f"{key_prefix}emb:{name}:")
