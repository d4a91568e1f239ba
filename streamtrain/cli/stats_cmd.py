"""`streamtrain stats`: the stream statistics worker (faust-streaming), events -> Redis."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from streamtrain.cli.common import add_config_flags, config_from_args
from streamtrain.cli.exit_codes import InputError
from streamtrain.config import StreamtrainConfig
from streamtrain.services import ServiceError

if TYPE_CHECKING:
    from consumers.stats_app import StatsSettings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stats", help="count events per item and user (windowed, decayed) and write snapshots to Redis",
        description="A faust-streaming worker on the events topic (kafka.topic): windowed and decayed exposure, "
                    "click and conversion counts per item and per user in Faust tables with changelog topics, and "
                    "every stats.snapshot_every_s a Redis snapshot under redis.key_prefix: popularity rank and "
                    "quantile, smoothed CTR and CVR. The daemon reads it with popularity.backend=redis. Needs "
                    "redis.url. Runs until SIGTERM/Ctrl-C; after a crash it restores its tables from the changelog.")
    add_config_flags(parser)
    parser.set_defaults(func=_stats)


def settings_from_config(config: StreamtrainConfig) -> StatsSettings:
    """The worker's settings from the one config (its priors are the popularity source's)."""
    from consumers.stats_app import StatsSettings
    from consumers.stats_store import Priors

    if not config.redis.url:
        raise InputError("streamtrain stats needs redis.url (where the snapshots go)")
    pop, stats = config.popularity, config.stats
    return StatsSettings(
        bootstrap_servers=config.kafka.bootstrap_servers, topic=config.kafka.topic, redis_url=config.redis.url,
        key_prefix=config.redis.key_prefix, stats=stats, decoder=config.decoder,
        priors=Priors(pop.ctr_prior_strength, pop.default_ctr, stats.cvr_prior_strength, stats.default_cvr),
        data_dir=config.run_dir / "stats", session_timeout_ms=config.kafka.session_timeout_ms)


def _stats(args: argparse.Namespace) -> int:
    from consumers.stats_app import StatsWorker  # faust only for this command

    settings = settings_from_config(config_from_args(args))
    try:
        worker = StatsWorker(settings)
    except RuntimeError as exc:  # the events topic never appeared
        raise ServiceError(str(exc)) from None
    return worker.run()
