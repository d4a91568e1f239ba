"""The one typed, validated configuration of streamtrain.

Precedence, lowest to highest (each layer overrides only the keys it names):

1. defaults in the models below (every field has one, with the reason beside it);
2. the YAML file (``--config FILE``);
3. environment variables ``STREAMTRAIN_<SECTION>__<FIELD>[__<SUBFIELD>...]``
   (double underscore separates levels; values are parsed as YAML scalars, so
   ``STREAMTRAIN_TRAINER__BATCH_SIZE=512`` is an int and ``...=[a, b]`` a list);
4. command-line overrides ``--set section.field=value`` (YAML scalar values).

Unknown keys are errors at every layer. :func:`load_config` raises :class:`ConfigError`
whose message has one line per problem, naming the dotted field and what is allowed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamtrain.simulator.config import SimulatorConfig

ENV_PREFIX = "STREAMTRAIN_"


class Section(BaseModel):
    """Base of every config section: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaConfig(Section):
    bootstrap_servers: str = "127.0.0.1:9092"  # overridden by the embedded broker in `demo`
    events_topic: str = "events"  # DESIGN.md §1 topic names
    dlq_topic: str = "events.dlq"
    samples_topic: str = "samples"
    truth_topic: str = "events.truth"  # simulator ground truth (oracle AUC)
    group_id: str = "streamtrain"
    partitions: int = Field(4, ge=1)  # used when streamtrain creates the topics itself
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"  # a new group must not skip history
    session_timeout_ms: int = Field(6000, ge=1000)  # first join waits half of this (Tansu)
    client_overrides: dict[str, str | int | float | bool] = Field(
        default_factory=dict
    )  # passed verbatim to librdkafka: security.protocol, sasl.*, ssl.* ...


class RedisConfig(Section):
    url: str | None = None  # None: in-process popularity, no Redis tier; `demo` starts an embedded one
    key_prefix: str = "streamtrain:"  # namespace keys so several jobs can share one Redis


class FeaturesConfig(Section):
    """Declared features, as ``<scope>.<name>`` with scope user | item | context."""

    sparse: list[str] = Field(default_factory=lambda: ["user.segment", "item.category", "context.device"])
    dense: list[str] = Field(default_factory=lambda: ["item.price"])

    @field_validator("sparse", "dense")
    @classmethod
    def _scoped(cls, names: list[str]) -> list[str]:
        for name in names:
            scope, _, field = name.partition(".")
            if scope not in ("user", "item", "context") or not field:
                raise ValueError(f"{name!r} must be '<scope>.<name>' with scope one of user, item, context")
        if len(set(names)) != len(names):
            raise ValueError("duplicate feature names")
        return names


class TrainerConfig(Section):
    batch_size: int = Field(256, ge=1)  # samples per step; boundaries follow sample counts, not time
    learning_rate: float = Field(1e-3, gt=0)  # dense params (Adam)
    seed: int = 0  # fixes init and every RNG so a replay is bit-identical
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    poll_max_messages: int = Field(2000, ge=1)  # per consume() call; bounds latency per loop turn


class PublishingConfig(Section):
    root: Path = Path("runs/default/published")
    every_samples: int = Field(20_000, ge=1)  # release cadence while the gate is OPEN
    every_seconds: float | None = None  # optional wall-clock cadence in addition
    keep_versions: int = Field(10, ge=1)  # older versions are pruned; CURRENT's is never pruned


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback unless configured (DESIGN §6.5)
    port: int = Field(9464, ge=0, le=65535)  # 0 = pick a free port


class ControlConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback unless configured (DESIGN §6.5)
    port: int = Field(9465, ge=0, le=65535)  # 0 = pick a free port
    token: str | None = None  # required for POST; None = generated at start and written to the run dir


class StreamtrainConfig(Section):
    """The whole effective configuration (``streamtrain config show`` prints it)."""

    run_dir: Path = Path("runs/default")  # logs, tokens, default checkpoint/publish roots live under it
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    features: FeaturesConfig = FeaturesConfig()
    trainer: TrainerConfig = TrainerConfig()
    publishing: PublishingConfig = PublishingConfig()
    metrics: MetricsConfig = MetricsConfig()
    control: ControlConfig = ControlConfig()
    simulator: SimulatorConfig = SimulatorConfig()  # used by `simulate` and `demo`

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """sha256 of the canonical JSON form: written into every checkpoint manifest."""
        return hashlib.sha256(orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()


class ConfigError(ValueError):
    """Invalid configuration; ``str()`` has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{'.'.join(path)}: {key} is not a section"])
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``STREAMTRAIN_A__B=v`` -> ``{"a": {"b": v}}``. Non-config variables are ignored
    (``STREAMTRAIN_CACHE`` and ``STREAMTRAIN_LOG_*`` configure the process, not the job)."""
    tree: dict[str, Any] = {}
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX):].split("__")]
        _set_path(tree, path, _parse_scalar(raw))
    return tree


def flag_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """``["trainer.batch_size=512"]`` -> ``{"trainer": {"batch_size": 512}}``."""
    tree: dict[str, Any] = {}
    problems = []
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected section.field=value")
            continue
        _set_path(tree, key.strip().split("."), _parse_scalar(raw))
    if problems:
        raise ConfigError(problems)
    return tree


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def format_validation_error(exc: ValidationError, root: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """One line per problem: ``dotted.field: what is wrong (got value)``; unknown keys list
    the allowed ones."""
    lines = []
    for err in exc.errors():
        where = prefix + (".".join(str(p) for p in err["loc"]) or "(top level)")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _model_at(root or StreamtrainConfig, err["loc"][:-1])
            if parent is not None:
                msg += f" (allowed: {', '.join(sorted(parent.model_fields))})"
        lines.append(f"{where}: {msg} (got {err.get('input')!r})" if err["type"] != "extra_forbidden" else f"{where}: {msg}")
    return lines


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def build_config(*layers: Mapping[str, Any]) -> StreamtrainConfig:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer)
    try:
        return StreamtrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> StreamtrainConfig:
    """Defaults < YAML file < environment < ``--set`` overrides (module docstring)."""
    file_layer = read_yaml(path) if path is not None else {}
    env_layer = env_overrides(os.environ if environ is None else environ)
    return build_config(file_layer, env_layer, flag_overrides(overrides))


def dump_yaml(config: StreamtrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
