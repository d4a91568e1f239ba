"""Configuration of the consumer side: one frozen model per component.

Every field has a default and a comment saying why. The daemon embeds these models in
its main config; :class:`IngestConfig` bundles them for ``run_join`` and for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


FEATURE_SCOPES = ("user", "item", "context")  # the event objects features are read from


def check_feature_names(names: Sequence[str]) -> Any:
    """Declared feature names are ``<scope>.<name>`` and unique; returns ``names``."""
    for name in names:
        scope, _, field = name.partition(".")
        if scope not in FEATURE_SCOPES or not field:
            raise ValueError(f"{name!r} must be '<scope>.<name>' with scope one of {', '.join(FEATURE_SCOPES)}")
    if len(set(names)) != len(names):
        raise ValueError("duplicate feature names")
    return names


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSourceConfig(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"  # local broker; the daemon passes the real one
    topic: str = "events"  # DESIGN §1 topic name; key = user_id
    group_id: str = "streamtrain"  # one group per trainer job; offsets in it serve lag tools only
    mode: Literal["subscribe", "assign"] = "subscribe"  # assign: all partitions, no rebalances (replays)
    only_partitions: tuple[int, ...] | None = None  # assign mode: just these (a scale-out rank's share); None = all
    start: Literal["earliest", "latest"] = "earliest"  # where a partition with no known position starts
    resume_from_committed: bool = False  # False: offsets belong to checkpoints, commits only feed lag tools
    session_timeout_ms: int = Field(6000, ge=1000)  # small for fast local joins (Tansu waits half of it)
    max_poll_interval_ms: int = Field(300_000, ge=1000)  # a long train step must not cost us the group
    stall_log_interval_s: float = Field(30.0, gt=0)  # one log line per interval while the broker stalls
    error_backoff_s: float = Field(0.2, ge=0)  # pause after a client exception so a dead broker is not spun on
    client_overrides: dict[str, str | int | float | bool] = Field(default_factory=dict)  # verbatim librdkafka keys


class DecoderConfig(_Frozen):
    max_message_bytes: int = Field(65_536, ge=256)  # events are ~0.5 KiB; anything this big is garbage
    max_id_chars: int = Field(256, ge=1)  # user/item/request ids longer than this are garbage, not ids
    min_ts_ms: int = 946_684_800_000  # 2000-01-01: older timestamps are unit errors (seconds, not ms)
    max_ts_ms: int = 4_102_444_800_000  # 2100-01-01: keeps a garbage ts from pushing the watermark to infinity
    max_clock_skew_ms: int | None = None  # None: no wall-clock check (replays and the simulator run in their own time)
    check_key: bool = True  # key must be the user_id: dedupe and joins are partition-local (docs/events.md: turning it off)

    @model_validator(mode="after")
    def _ordered(self) -> "DecoderConfig":
        if self.min_ts_ms >= self.max_ts_ms:
            raise ValueError("min_ts_ms must be smaller than max_ts_ms")
        return self


def _default_gap_edges() -> tuple[int, ...]:
    # 1 s .. ~12 days, doubling: log buckets resolve both "same session" and "came back next week".
    return tuple(1000 * 2**i for i in range(21))


class JoinerConfig(_Frozen):
    click_window_ms: int = Field(600_000, gt=0)  # clicks come within seconds-minutes; a longer window delays every sample
    convert_window_ms: int = Field(7_200_000, gt=0)  # measured from the click; covers the simulator's 1 h max delay
    allowed_lateness_ms: int = Field(5_000, ge=0)  # arrival jitter tolerated before an event counts as too late
    policy: Literal["wait", "emit_then_correct"] = "wait"  # wait: final labels, no correction rows for the trainer
    max_pending_samples: int = Field(2_000_000, ge=1)  # beyond this the oldest samples are emitted early (counted)
    max_buffered_events: int = Field(1_000_000, ge=1)  # reorder buffer cap; beyond it the watermark is forced on
    dedupe_window: int = Field(100_000, ge=1)  # event ids remembered per partition (producer retries land close)
    max_future_ms: int = Field(1_800_000, gt=0)  # held, not trusted, beyond this ahead of the partition's time: catches time-zone and date slips
    confirm_events: int = Field(32, ge=1)  # a held event is confirmed by this many events in time order from it, rejected by as many behind it
    max_quarantined: int = Field(1024, ge=1)  # held events per partition; beyond it the oldest is decided on its evidence (counted)
    topic_id_window: int = Field(262_144, ge=1)  # finalised event ids / exposure keys remembered across partitions
    history_len: int = Field(32, ge=1)  # L: history events per sample (HSTU sequence length)
    max_history_users: int = Field(100_000, ge=1)  # users with a history ring; ~0.6 KB each at L=32; least recent evicted
    gap_bucket_edges_ms: tuple[int, ...] = Field(default_factory=_default_gap_edges)  # log-spaced gap buckets
    num_random_negatives: int = Field(4, ge=0)  # K: extra random negatives per sample
    item_pool_size: int = Field(8192, ge=1)  # recent exposures that random negatives are drawn from (popularity-weighted)
    stats_refresh_ms: int = Field(60_000, gt=0)  # event-time cadence of popularity snapshots and evictions
    seed: int = 0  # mixes into every per-sample negative draw: same seed, same negatives
    sparse_features: tuple[str, ...] = ("user.segment", "item.category", "context.device")  # S columns, hashed
    dense_features: tuple[str, ...] = ("item.price",)  # D columns, float32, NaN when missing

    @model_validator(mode="after")
    def _quarantine_fits_a_confirmation(self) -> "JoinerConfig":
        if self.max_quarantined < self.confirm_events:
            raise ValueError("max_quarantined must be at least confirm_events")
        return self

    @field_validator("gap_bucket_edges_ms")
    @classmethod
    def _increasing(cls, edges: tuple[int, ...]) -> tuple[int, ...]:
        if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("gap_bucket_edges_ms must be positive and strictly increasing")
        return edges

    @field_validator("sparse_features", "dense_features")
    @classmethod
    def _scoped(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return check_feature_names(names)

    @property
    def num_gap_buckets(self) -> int:
        """Embedding rows the model needs for ``gap_bucket``/``hist_gap_buckets`` (0 = no gap)."""
        return len(self.gap_bucket_edges_ms) + 2


class PopularityConfig(_Frozen):
    backend: Literal["in_process", "redis"] = "in_process"  # redis: the stats worker's snapshots, local counts as fallback
    redis_url: str | None = None  # required for backend=redis (the daemon derives it from redis.url)
    key_prefix: str = "streamtrain:"  # namespace shared with the stats worker (the daemon derives it from redis.key_prefix)
    refresh_s: float = Field(60.0, gt=0)  # backend=redis: a checkpoint (and with it a snapshot fetch) at least this often
    hot_quantile: float = Field(0.8, gt=0, lt=1)  # items above this popularity quantile are "hot"
    max_items: int = Field(1_000_000, ge=1)  # in-process counters; least recently seen items evicted
    max_users: int = Field(1_000_000, ge=1)  # in-process user CTR counters; least recently seen evicted
    ctr_prior_strength: float = Field(20.0, gt=0)  # pseudo-exposures pulling a CTR towards the global mean
    default_ctr: float = Field(0.05, gt=0, lt=1)  # global mean before any click is counted

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "PopularityConfig":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url (set redis.url)")
        return self


class StatsConfig(_Frozen):
    """The stream statistics worker (`streamtrain stats`, ``consumers/stats_app.py``).

    Windows and decay run on event time. Popularity is the decayed exposure count; CTR and
    CVR priors use the decayed counts with a Beta prior (its CTR strength and default are
    ``popularity.ctr_prior_strength`` / ``default_ctr``, so the joiner's fallback counts and
    the worker smooth alike)."""

    app_id: str = "streamtrain-stats"  # Faust app id: consumer group and changelog topic prefix
    bucket_ms: int = Field(300_000, gt=0)  # 5 min buckets: the granularity of the sliding window
    window_buckets: int = Field(12, ge=1, le=1024)  # 12 x 5 min: windowed counts cover the last hour of event time
    half_life_ms: int = Field(3_600_000, gt=0)  # decayed counts halve per hour of event time
    forget_after_ms: int = Field(86_400_000, gt=0)  # ids unseen for a day of event time leave the tables (weight < 2^-24)
    cvr_prior_strength: float = Field(20.0, gt=0)  # pseudo-clicks pulling a CVR towards the global mean
    default_cvr: float = Field(0.1, gt=0, lt=1)  # global CVR before any conversion is counted
    snapshot_every_s: float = Field(10.0, gt=0)  # T: wall seconds between Redis snapshots
    ttl_s: int = Field(3600, ge=1)  # snapshot keys outlive a dead worker this long, then readers fall back to local counts
    take_max: int = Field(2000, ge=1)  # events handled per step (one changelog write per touched key)
    take_within_s: float = Field(0.2, gt=0)  # a step waits at most this long for take_max events
    changelog_replication: int = Field(1, ge=1)  # changelog topics' replication factor (3 on a production cluster)
    web_port: int | None = None  # None: Faust's web server off; else it binds 127.0.0.1:port (DESIGN §6.5)

    @model_validator(mode="after")
    def _window_fits(self) -> "StatsConfig":
        if self.forget_after_ms < self.bucket_ms * self.window_buckets:
            raise ValueError("forget_after_ms must cover the window (bucket_ms * window_buckets)")
        return self


class IngestConfig(_Frozen):
    """Everything ``run_join`` needs; the daemon embeds the parts it uses."""

    source: KafkaSourceConfig = KafkaSourceConfig()
    decoder: DecoderConfig = DecoderConfig()
    joiner: JoinerConfig = JoinerConfig()
    popularity: PopularityConfig = PopularityConfig()
    dlq_topic: str = "events.dlq"  # DESIGN §1
    samples_topic: str = "samples"  # DESIGN §1; Arrow IPC record batches
    poll_max_messages: int = Field(2000, ge=1)  # per consume() call; bounds latency per loop turn
    poll_timeout_s: float = Field(0.5, gt=0)  # how long one poll waits for the first message
    commit_interval_s: float = Field(5.0, gt=0)  # run_join commits its safe offsets this often (lag tools)
