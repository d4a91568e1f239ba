"""The demo daemon that the daemon benchmark's parts run: its config, a seeded log of its world.

Every part that runs a daemon builds its config the same way: ``configs/demo.yaml`` (the
file ``streamtrain demo`` reads), then the part's own layers (its run dir and topic, a
checkpoint cadence...), then the user's ``--set`` overrides, on the part's shared broker.
The benchmark lives in the checkout, so it reads the checkout's ``configs/demo.yaml``
beside it. No Redis: the demo's tables never evict at this size, so the cold tier would
not be touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtrain.config import StreamtrainConfig, build_config, flag_overrides, read_yaml
from streamtrain.services import EmbeddedBroker
from streamtrain.services.topics import create_topics
from streamtrain.simulator import KafkaSink, run_simulation

DEMO_CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def read_demo_config() -> dict[str, Any]:
    """The demo's config layer (``configs/demo.yaml``), for any benchmark that runs the demo model."""
    return read_yaml(DEMO_CONFIG_FILE)


@dataclass(frozen=True)
class DemoSetup:
    """How the parts build their daemons' configs (``load`` reads the file and the flags once)."""

    broker: EmbeddedBroker  # shared by every part of this run
    demo: Mapping[str, Any]  # configs/demo.yaml
    overrides: Mapping[str, Any]  # --set, applied last to every daemon config

    @classmethod
    def load(cls, broker: EmbeddedBroker, overrides: Sequence[str]) -> DemoSetup:
        return cls(broker=broker, demo=read_demo_config(), overrides=flag_overrides(overrides))

    def config(self, run_dir: Path, topic: str, **layers: Any) -> StreamtrainConfig:
        """The demo's config with its own run dir and topic; ``layers``: extra sections, merged
        over the demo's and under ``--set``."""
        kafka = {"bootstrap_servers": self.broker.bootstrap_servers, "topic": topic, "dlq_topic": f"{topic}.dlq"}
        return build_config(self.demo, {"run_dir": str(run_dir), "kafka": kafka}, layers, self.overrides)


def produce_log(config: StreamtrainConfig, exposures: int, mark_end: bool = False) -> dict[str, Any]:
    """A seeded log of the demo world on ``config``'s topic, produced as fast as possible
    (with ``mark_end``, ended by end-of-input markers: a daemon trains all of it and exits);
    returns the simulator's summary."""
    kafka = config.kafka
    create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
    sim = config.simulator.model_copy(update={"rate": 0.0, "time_scale": 0.0, "exposures": exposures})
    return run_simulation(sim, KafkaSink(kafka.bootstrap_servers, kafka.topic, mark_end=mark_end)).summary()


def broker_state(broker: EmbeddedBroker) -> str:
    """For error messages: is the broker process still there, and in which state."""
    if broker.pid is None:
        return "broker not running"
    try:
        with open(f"/proc/{broker.pid}/status") as f:
            state = next((line.split(None, 1)[1].strip() for line in f if line.startswith("State:")), "?")
    except OSError:
        return f"broker pid {broker.pid} is gone (log {broker.log_path})"
    return f"broker pid {broker.pid} state {state} (log {broker.log_path})"
