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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from checkpoints.config import CheckpointConfig
from consumers.config import (
    DecoderConfig,
    IngestConfig,
    JoinerConfig,
    KafkaSourceConfig,
    PopularityConfig,
    StatsConfig,
    check_feature_names,
)
from monitors.config import MonitorsConfig
from streamtrain.embedding import EmbeddingTableConfig
from streamtrain.modules.config import ModelConfig
from streamtrain.simulator.config import SimulatorConfig

ENV_PREFIX = "STREAMTRAIN_"


class Section(BaseModel):
    """Base of every config section: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaConfig(KafkaSourceConfig):
    """Connection, topics and consumer behaviour (``topic`` is the input events topic)."""

    mode: Literal["subscribe", "assign"] = "assign"  # one trainer reads every partition: no rebalances, exact replays
    dlq_topic: str = "events.dlq"  # DESIGN.md §1 topic names
    samples_topic: str = "samples"  # Arrow IPC output of `streamtrain join`
    partitions: int = Field(4, ge=1)  # used only when streamtrain creates the topics itself


class RedisConfig(Section):
    url: str | None = None  # None: in-process popularity, no Redis tier; `demo` starts an embedded one
    key_prefix: str = "streamtrain:"  # namespace keys so several jobs can share one Redis


class FeaturesConfig(Section):
    """Declared features, as ``<scope>.<name>`` with scope user | item | context: the
    joiner reads them from events, the model gets one column each, the drift monitor
    watches each."""

    sparse: list[str] = Field(default_factory=lambda: ["user.segment", "item.category", "context.device"])  # hashed ids, one embedding each
    dense: list[str] = Field(default_factory=lambda: ["item.price"])  # float32 values; missing -> NaN, the model adds an indicator

    @field_validator("sparse", "dense")
    @classmethod
    def _scoped(cls, names: list[str]) -> list[str]:
        return check_feature_names(names)  # type: ignore[no-any-return]


class TrainerConfig(Section):
    batch_size: int = Field(256, ge=1)  # samples per step; boundaries follow sample counts, not time
    learning_rate: float = Field(1e-3, gt=0)  # dense params (Adam)
    seed: int = 0  # fixes init and every RNG so a replay is bit-identical
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    poll_max_messages: int = Field(2000, ge=1)  # per consume() call; bounds latency per loop turn
    poll_timeout_s: float = Field(0.05, gt=0)  # consume() waits this long unless a full poll arrives: it bounds
    # pipeline latency (measured p50 0.37 s at 0.05 vs 0.55 s at 0.2 in bench/daemon.py)
    threads: int = Field(1, ge=1)  # torch intra-op threads, fixed so CPU results are bit-reproducible; 1 beats 2 on a
    # 2-core box (measured 3400 vs 730 samples/s: torch threads fight librdkafka's for the cores)
    compile: Literal["off", "auto", "on"] = "auto"  # torch.compile of the sequence encoder (dynamic shapes); auto:
    # CUDA only, where it removes per-kernel launch overhead. On CPU a compile costs minutes at start and
    # per new shape class, and the step's bits would depend on which kernels were compiled when (a
    # replay starts cold), so CPU runs and the recovery proof stay eager


class OverloadConfig(Section):
    """What the daemon does when events arrive faster than it trains (docs/operations.md, Overload):
    train every positive and a keep-rate share of the unclicked exposures, weighted 1/rate in the
    CTR/CTCVR losses. The rate changes only at checkpoints and is saved in them (exact replay)."""

    mode: Literal["off", "auto", "fixed"] = "off"  # off: every sample is trained (a dropped negative is a modelling
    # change the operator opts into, and two runs of one log stay comparable whatever their speed); auto:
    # down-sample only while the backlog is long AND growing (replays and catch-ups still train every sample);
    # fixed: always keep_rate. The lag alarm works in every mode and names auto as the remedy.
    keep_rate: float = Field(1.0, gt=0, le=1)  # mode=fixed: share of unclicked exposures trained
    min_keep_rate: float = Field(0.1, gt=0, le=1)  # mode=auto floor: below ~0.1 the 1/rate weights make the CTR
    # loss noisy (one kept negative stands for 10+) and the monitors' windows thin out
    backlog_high_s: float = Field(30.0, gt=0)  # auto halves the rate while the backlog (lag / consumption speed)
    # exceeds this and grows: a few checkpoint intervals of delay is worth trading negatives for
    backlog_low_s: float = Field(5.0, ge=0)  # auto doubles the rate once the backlog is below this; the gap to
    # backlog_high_s is the hysteresis that keeps the rate from flapping at every checkpoint
    decide_every_s: float = Field(15.0, gt=0)  # auto cuts a checkpoint ("overload") to change the rate at most this
    # often; the rate may only change at a checkpoint, and the cadence checkpoints can be minutes apart
    window_s: float = Field(5.0, gt=0)  # the backlog is measured over windows this long (consumption speed, growth)
    alarm_backlog_s: float = Field(60.0, gt=0)  # lag alarm (any mode): an alert when the backlog exceeds this,
    # cleared below half of it; freshness that far behind is an incident even while down-sampling copes

    @model_validator(mode="after")
    def _ordered(self) -> "OverloadConfig":
        if self.backlog_low_s >= self.backlog_high_s:
            raise ValueError("overload.backlog_low_s must be < backlog_high_s (the hysteresis band)")
        return self


class EmbeddingsConfig(Section):
    """One dynamic table per id space; ``dim`` and ``name`` are filled from the model/keys."""

    item: EmbeddingTableConfig = EmbeddingTableConfig(name="item")
    user: EmbeddingTableConfig = EmbeddingTableConfig(name="user")
    sparse: EmbeddingTableConfig = EmbeddingTableConfig(name="sparse", initial_rows=1024)  # few distinct values


class PublishingConfig(Section):
    root: Path | None = None  # None: <run_dir>/published
    every_samples: int = Field(20_000, ge=1)  # release cadence while the gate is OPEN
    every_seconds: float | None = None  # optional wall-clock cadence in addition
    keep_versions: int = Field(10, ge=1)  # older versions are pruned
    shadow_window: int = Field(4096, ge=0)  # held-out samples both models score before a release; 0 = no shadow check
    shadow_tolerance: float = Field(0.01, ge=0)  # hold a release whose log-loss is worse than CURRENT's by more
    rollback_margin_samples: int = Field(40_000, ge=0)  # action=rollback: last version released this long before the freeze


class ServingConfig(Section):
    """Published embeddings in Redis for online lookup (``runtime/serving.py``; the key
    layout is in docs/architecture.md). Active when ``redis.url`` is set."""

    push: bool = True  # write each published version's embeddings to Redis (off: files only)
    keep_versions: int = Field(3, ge=1)  # versions kept in Redis, so a rollback within them is a pointer move
    expire_grace_s: int = Field(60, ge=1)  # an older version's keys live this long after it drops out (readers mid-lookup)


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
    """The whole effective configuration (``streamtrain config show`` prints it).

    ``features`` is the one place features are declared; the joiner's feature lists and
    the model's feature counts follow from it, as do every table's ``dim`` (from
    ``model.embedding_dim``) and the default checkpoint/publish roots (under ``run_dir``).
    Setting a derived value explicitly to something inconsistent is an error.
    """

    run_dir: Path = Path("runs/default")  # logs, control token, default checkpoint/publish roots
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    features: FeaturesConfig = FeaturesConfig()
    decoder: DecoderConfig = DecoderConfig()
    joiner: JoinerConfig = JoinerConfig()
    popularity: PopularityConfig = PopularityConfig()
    model: ModelConfig = ModelConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    trainer: TrainerConfig = TrainerConfig()
    overload: OverloadConfig = OverloadConfig()  # negative down-sampling when the daemon falls behind
    checkpoints: CheckpointConfig = CheckpointConfig()  # root defaults to <run_dir>/checkpoints
    monitors: MonitorsConfig = MonitorsConfig()
    publishing: PublishingConfig = PublishingConfig()
    serving: ServingConfig = ServingConfig()
    stats: StatsConfig = StatsConfig()  # `streamtrain stats`: the stream statistics worker
    metrics: MetricsConfig = MetricsConfig()
    control: ControlConfig = ControlConfig()
    simulator: SimulatorConfig = SimulatorConfig()  # used by `simulate` and `demo`

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
        features = data.get("features") or {}
        defaults = FeaturesConfig()
        sparse = features.get("sparse", defaults.sparse) if isinstance(features, dict) else defaults.sparse
        dense = features.get("dense", defaults.dense) if isinstance(features, dict) else defaults.dense
        joiner = data.setdefault("joiner", {})
        model = data.setdefault("model", {})
        if isinstance(joiner, dict):
            joiner.setdefault("sparse_features", sparse)
            joiner.setdefault("dense_features", dense)
        if isinstance(model, dict) and isinstance(sparse, list) and isinstance(dense, list):
            model.setdefault("num_sparse_features", len(sparse))
            model.setdefault("num_dense_features", len(dense))
        redis = data.get("redis") or {}
        popularity = data.setdefault("popularity", {})
        if isinstance(popularity, dict) and isinstance(redis, dict):
            # One Redis and one namespace for the stats worker (writer) and the popularity source (reader).
            popularity.setdefault("key_prefix", redis.get("key_prefix", RedisConfig().key_prefix))
            if redis.get("url"):
                popularity.setdefault("redis_url", redis["url"])
        run_dir = Path(str(data.get("run_dir", "runs/default")))
        ckpt = data.setdefault("checkpoints", {})
        if isinstance(ckpt, dict):
            ckpt.setdefault("root", run_dir / "checkpoints")
        dim = model.get("embedding_dim", ModelConfig().embedding_dim) if isinstance(model, dict) else None
        tables = data.setdefault("embeddings", {})
        if isinstance(tables, dict):
            for name in EmbeddingsConfig.model_fields:
                table = tables.get(name)
                table = dict(table) if isinstance(table, Mapping) else {} if table is None else table
                if isinstance(table, dict):
                    # The field's default (e.g. a small sparse table) under the user's values.
                    default = EmbeddingsConfig.model_fields[name].default
                    table = {**default.model_dump(include=default.model_fields_set), **table}
                    if dim is not None:
                        table.setdefault("dim", dim)
                tables[name] = table
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "StreamtrainConfig":
        problems = []
        if list(self.joiner.sparse_features) != self.features.sparse or list(self.joiner.dense_features) != self.features.dense:
            problems.append("joiner.sparse_features/dense_features must equal features.sparse/dense (declare features once, in features)")
        if self.model.num_sparse_features != len(self.features.sparse) or self.model.num_dense_features != len(self.features.dense):
            problems.append("model.num_sparse_features/num_dense_features must equal the number of declared features")
        for name in EmbeddingsConfig.model_fields:
            if getattr(self.embeddings, name).dim != self.model.embedding_dim:
                problems.append(f"embeddings.{name}.dim must equal model.embedding_dim ({self.model.embedding_dim})")
        if self.model.num_gap_buckets < self.joiner.num_gap_buckets:
            problems.append(f"model.num_gap_buckets ({self.model.num_gap_buckets}) must be >= the joiner's "
                            f"{self.joiner.num_gap_buckets} (len(joiner.gap_bucket_edges_ms) + 2)")
        if self.popularity.key_prefix != self.redis.key_prefix:
            problems.append("popularity.key_prefix must equal redis.key_prefix (set the namespace once, in redis)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def ingest(self) -> IngestConfig:
        """The consumer side's view of this config (what ``consumers.runtime`` takes)."""
        return IngestConfig(source=self.kafka, decoder=self.decoder, joiner=self.joiner, popularity=self.popularity,
                            dlq_topic=self.kafka.dlq_topic, samples_topic=self.kafka.samples_topic,
                            poll_max_messages=self.trainer.poll_max_messages, poll_timeout_s=self.trainer.poll_timeout_s)

    @property
    def published_root(self) -> Path:
        return self.publishing.root or self.run_dir / "published"

    @property
    def endpoints_path(self) -> Path:
        """Where a running daemon writes the addresses it listens on (ports may be picked at start)."""
        return self.run_dir / "endpoints.json"

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
