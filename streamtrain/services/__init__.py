"""Embedded side services for local runs and tests: a Kafka-compatible broker and Redis.

Both are real servers in child processes bound to loopback, usable as context managers,
from the CLI (``streamtrain broker`` / ``streamtrain redis``) and as pytest fixtures.
"""

from streamtrain.services.broker import EmbeddedBroker
from streamtrain.services.process import ServiceError
from streamtrain.services.redis_server import EmbeddedRedis

__all__ = ["EmbeddedBroker", "EmbeddedRedis", "ServiceError"]
