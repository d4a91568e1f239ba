"""Model quality on the same rows as strong baselines and the oracle: the real daemon over seeded streams.

    python -m bench.quality [--quick] [--seeds 0 1 2] [--exposures N] [--offline] [--no-meanpool]
                            [--window ROWS] [--mf-lrs R ...] [--plot PNG] [--keep DIR] [--set SECTION.FIELD=V ...]

For each seed, a stream of the demo world (``configs/demo.yaml``: 500 users, 1,000 items,
``emit_then_correct``) is produced to an embedded broker, ended by end-of-input markers,
with the simulator's truth (true pCTR / pCVR of every exposure) kept aside. The real daemon
(``streamtrain.runtime.Daemon``: Kafka source, decoder, joiner, trainer, monitors,
checkpoints, releases) trains the whole stream; its ``on_trained`` hook records every row
with the model's prequential scores (made before it learned from the row). ``--offline``
skips Kafka and the daemon for fast screening: the same events, partitioned by user as the
Kafka sink does, go through the real consumer pipeline from an in-memory source into
``Trainer.step`` (what ``docs/model_quality.md``'s screening used); with
``--set overload.mode=fixed --set overload.keep_rate=R`` it down-samples negatives between
the batches and the trainer as the daemon does (``streamtrain/runtime/overload.py``), and
the evaluated rows are the trained ones (AUC is unbiased under that label-independent
subsampling of negatives; log-loss and calibration on them are not comparable).

Evaluated rows: exposures in the order the trainer saw them; correction rows of
``emit_then_correct`` are not new rows and only complete their exposure's CTCVR label. On
exactly those rows, in that order:

* **oracle** -- the simulator's true probabilities, joined by ``sample_id = hash_id(event_id)``;
* **prior** -- the item's label rate so far with a Beta prior on the running global rate;
* **online MF** -- per-event logistic matrix factorisation (biases + rank-8 factors,
  Adagrad), scored before each update; its learning rate is the best of a grid *on the
  evaluated rows themselves*, which favours the baseline (a model that beats it beats
  every rate of the grid); its CTCVR variant learns each row's final label at once, also in
  its favour;
* **meanpool** -- our model with the HSTU encoder replaced by a causal mean of the history
  (``model.sequence_encoder=meanpool``), trained on the same stream the same way.

AUC (CTR: P(click) vs click; CTCVR: P(click & convert) vs click x convert) per window of
``--window`` rows, on the second half and on the last 20 % of the rows; the model's
log-loss and calibration (mean prediction / observed rate). Retrieval (leave-last-out
HR@K / NDCG@K, ``streamtrain.retrieval.evaluate``) of the final model, beside popularity.
The first seed's run directory gets ``oracle.jsonl`` and ``baselines.jsonl`` (the report's
curve contract, ``streamtrain/report/curves.py``) and the learning-curve PNG (``--plot``
elsewhere). The last line is one JSON object; its top-level AUCs are over the last 20 % of
rows, averaged over seeds (per-seed figures under ``seeds``).

``--quick``: one seed of 100k exposures (a few minutes on an idle 2-core machine).
Full: seeds 0, 1, 2 of 600k exposures each.
"""

from __future__ import annotations

import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.baselines import auc, best_learning_rate, calibration, item_rate_prior, log_loss, online_mf
from bench.common import announce_quick, machine_info, parser, print_result, rounded
from bench.demo_setup import DemoSetup, read_demo_config
from consumers.batching import SampleBuffer
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity
from consumers.schema import SampleBatch, hash_id
from consumers.testing import BatchedPipeline, ListDlqSink, ListSource
from streamtrain.config import StreamtrainConfig, build_config, flag_overrides
from streamtrain.report.curves import BASELINES_FILE, ORACLE_FILE, CurveWriter
from streamtrain.retrieval.evaluate import evaluate as retrieval_metrics
from streamtrain.runtime import Daemon, DaemonHooks
from streamtrain.runtime.overload import DownSampler
from streamtrain.services import EmbeddedBroker
from streamtrain.services.topics import create_topics
from streamtrain.simulator import EventStream, KafkaSink, run_simulation
from streamtrain.trainer import StepResult, Trainer, build_trainer

MF_LRS = (0.05, 0.1, 0.2, 0.5, 1.0)  # 0.5 wins on the demo world (100k and 600k exposures)
ORACLE_FRACTION_TARGET = 0.95  # issue #12: our AUC >= 0.95 x oracle on long streams
LONG_STREAM = 600_000  # the oracle-fraction target applies from this many exposures
MEANPOOL = {"model": {"sequence_encoder": "meanpool"}}
# A quality run is about the model: no cadence checkpoints or releases in the way (the
# daemon still writes its final checkpoint).
RUN_LAYERS: dict[str, Any] = {"checkpoints": {"every_samples": None, "every_seconds": None, "fsync": False},
                              "publishing": {"every_samples": 10**12}, "metrics": {"enabled": False},
                              "control": {"enabled": False}, "trainer": {"device": "cpu"}}


@dataclass(frozen=True)
class Sizes:
    exposures: int
    seeds: tuple[int, ...]


QUICK = Sizes(exposures=100_000, seeds=(0,))
FULL = Sizes(exposures=600_000, seeds=(0, 1, 2))


class Truth:
    """The simulator's hidden probabilities per exposure (filled from its thread)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[float, float]] = {}  # sample id -> (pCTR, pCVR)
        self._lock = threading.Lock()

    def add(self, t: dict[str, Any]) -> None:
        with self._lock:
            self._by_id[hash_id(t["event_id"])] = (t["p_ctr"], t["p_cvr"])

    def at(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            missing = [i for i in sample_ids.tolist() if i not in self._by_id]
            if missing:
                raise ValueError(f"{len(missing)} samples have no simulator truth: the join by sample_id is broken")
            pairs = np.array([self._by_id[i] for i in sample_ids.tolist()]).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]


class Rows:
    """Every trained row in training order (corrections included) with its prequential
    scores: the trainer's ``on_trained`` hook (the daemon's, or the offline loop's)."""

    FIELDS = ("sample_id", "user", "item", "click", "convert", "is_correction")

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name in (*self.FIELDS, "p_ctr", "p_ctcvr")}
        self.losses: list[dict[str, float]] = []

    def __call__(self, batch: SampleBatch, result: StepResult) -> None:
        for name in self.FIELDS:
            self._parts[name].append(batch[name].copy())
        self._parts["p_ctr"].append(result.predictions.p_ctr)
        self._parts["p_ctcvr"].append(result.predictions.p_ctcvr)
        self.losses.append(result.losses)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self._parts.items()}


@dataclass
class Exposures:
    """The evaluated rows: exposures in training order with their final labels."""

    sample_id: np.ndarray
    user: np.ndarray
    item: np.ndarray
    click: np.ndarray
    ctcvr: np.ndarray  # click x convert, a late conversion (correction row) included
    p_ctr: np.ndarray
    p_ctcvr: np.ndarray

    @classmethod
    def of(cls, rows: dict[str, np.ndarray]) -> Exposures:
        first = ~rows["is_correction"]
        sample_id = rows["sample_id"][first]
        corrected = np.isin(sample_id, rows["sample_id"][rows["is_correction"] & (rows["convert"] > 0)])
        click = rows["click"][first]
        return cls(sample_id, rows["user"][first], rows["item"][first], click,
                   click * np.maximum(rows["convert"][first], corrected), rows["p_ctr"][first], rows["p_ctcvr"][first])


# ---------------------------------------------------------------------------- producing and training
def stream_config(base: dict[str, Any], exposures: int, seed: int, overrides: list[str], *layers: dict[str, Any]) -> StreamtrainConfig:
    """The demo's config with an unpaced, bounded, seeded simulator; ``--set`` last."""
    simulator = {"seed": seed, "exposures": exposures, "rate": 0.0, "time_scale": 0.0}
    return build_config(base, {"simulator": simulator}, RUN_LAYERS, *layers, flag_overrides(overrides))


def train_daemon(config: StreamtrainConfig) -> tuple[dict[str, np.ndarray], Rows, float, Trainer, dict[str, Any]]:
    """The real daemon over the whole stream (already on ``config``'s topic, with markers):
    its rows, its trainer and its joiner's history state (for the retrieval evaluation)."""
    rows = Rows()
    daemon = Daemon(config, stop=threading.Event(), hooks=DaemonHooks(on_trained=rows))
    started = time.perf_counter()
    summary = daemon.run()
    if summary.stopped_by != "end_of_input":
        raise RuntimeError(f"the daemon stopped by {summary.stopped_by}, not at the end of the stream")
    history = daemon.pipeline.joiner.history.state_dict()
    return rows.columns(), rows, summary.samples_trained / (time.perf_counter() - started), daemon.trainer, history


def train_offline(config: StreamtrainConfig, logs: dict[int, list[bytes]]) -> tuple[dict[str, np.ndarray], Rows, float, Trainer, dict[str, Any]]:
    """The same, without Kafka: the real consumer pipeline over an in-memory source ended by
    end-of-input markers, the real trainer, the daemon's batch cutting."""
    ingest = config.ingest()
    pipeline = IngestPipeline(ListSource(logs, topic=config.kafka.topic, end_of_input=True),
                              EventDecoder(ingest.decoder, ingest.joiner.sparse_features, ingest.joiner.dense_features),
                              LabelJoiner(ingest.joiner, InProcessPopularity(ingest.popularity)), ListDlqSink())
    batched = BatchedPipeline(pipeline, config.trainer.batch_size)
    torch.set_num_threads(config.trainer.threads)
    trainer = build_trainer(config, torch.device("cpu"))
    rows = Rows()
    train_s = 0.0
    # overload.mode=fixed down-samples negatives as the daemon does (auto needs a live backlog)
    sampler = DownSampler(config.trainer.batch_size, config.overload.keep_rate) if config.overload.mode == "fixed" else None
    raw = SampleBuffer(config.trainer.batch_size)

    def kept(batches: list[SampleBatch], done: bool) -> Iterator[SampleBatch]:
        if sampler is None:
            yield from batches
            return
        for batch in batches:
            raw.extend(batch)
        while (out := sampler.pop_batch(raw) or (sampler.drain(raw) if done else None)) is not None:
            yield out.batch

    while True:
        done = pipeline.end_of_input
        for batch in kept(batched.flush() if done else batched.poll(5000), done):
            start = time.perf_counter()
            rows(batch, trainer.step(batch))
            train_s += time.perf_counter() - start
        if done:
            break
    return rows.columns(), rows, trainer.samples / train_s, trainer, pipeline.joiner.history.state_dict()


def simulate_offline(config: StreamtrainConfig) -> tuple[dict[int, list[bytes]], Truth]:
    """Message values per partition, in the order a Kafka sink would append them."""
    logs: dict[int, list[bytes]] = {p: [] for p in range(config.kafka.partitions)}
    truth = Truth()
    for event in EventStream(config.simulator):
        logs[zlib.crc32(event.key) % config.kafka.partitions].append(event.value)  # librdkafka's keyed partitioner
        if event.truth is not None:
            truth.add(event.truth)
    return logs, truth


def produce(config: StreamtrainConfig) -> Truth:
    """The seeded stream on ``config``'s topic, ended by end-of-input markers; its truth."""
    kafka = config.kafka
    create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
    truth = Truth()
    run_simulation(config.simulator, KafkaSink(kafka.bootstrap_servers, kafka.topic, mark_end=True), truth_sink=truth.add)
    return truth


# ---------------------------------------------------------------------------- evaluation
def slices(n: int) -> dict[str, slice]:
    return {"second_half": slice(n // 2, n), "last_20pct": slice(n - n // 5, n)}


def evaluate(rows: Exposures, truth: Truth, mf_lrs: Sequence[float], window: int,
             meanpool: Exposures | None = None) -> dict[str, Any]:
    """Every scorer's AUC on the exposure rows (see the module docstring), per task."""
    true_ctr, true_cvr = truth.at(rows.sample_id)
    n = len(rows.sample_id)
    if meanpool is not None:
        position = {sid: k for k, sid in enumerate(meanpool.sample_id.tolist())}
        if set(position) != set(rows.sample_id.tolist()):
            raise RuntimeError("the meanpool run trained other rows than the model's")
        take = np.array([position[i] for i in rows.sample_id.tolist()])
    result: dict[str, Any] = {"rows": n, "ctr_rate": float(rows.click.mean()), "ctcvr_rate": float(rows.ctcvr.mean())}
    for task, labels, model, oracle in (("ctr", rows.click, rows.p_ctr, true_ctr),
                                        ("ctcvr", rows.ctcvr, rows.p_ctcvr, true_ctr * true_cvr)):
        mf_grid = online_mf(rows.user, rows.item, labels, mf_lrs)
        scorers = {"model": model, "prior": item_rate_prior(rows.item, labels), "oracle": oracle}
        if meanpool is not None:
            scorers["meanpool"] = (meanpool.p_ctr if task == "ctr" else meanpool.p_ctcvr)[take]
        out: dict[str, Any] = {}
        for name, cut in slices(n).items():
            lr, mf, by_lr = best_learning_rate(mf_grid, labels, mf_lrs, cut)
            out[name] = {k: rounded(auc(v[cut], labels[cut]), 4) for k, v in scorers.items()}
            out[name] |= {"mf": rounded(auc(mf[cut], labels[cut]), 4), "mf_lr": lr,
                          "mf_by_lr": {str(rate): rounded(a, 4) for rate, a in zip(mf_lrs, by_lr)},
                          "model_log_loss": rounded(log_loss(model[cut], labels[cut]), 4),
                          "model_calibration": rounded(calibration(model[cut], labels[cut]), 3)}
        _, scorers["mf"], _ = best_learning_rate(mf_grid, labels, mf_lrs, slices(n)["last_20pct"])
        out["windows"] = [{"rows": s + window, **{k: rounded(auc(v[s:s + window], labels[s:s + window]), 4)
                                                  for k, v in scorers.items()}} for s in range(0, n - window + 1, window)]
        result[task] = out
    last = result["ctr"]["last_20pct"]
    result["targets"] = {"beats_mf_last_20pct": last["model"] >= last["mf"],
                         "oracle_fraction_last_20pct": rounded(last["model"] / last["oracle"], 4)}
    if n >= LONG_STREAM:
        result["targets"]["reaches_oracle_fraction"] = last["model"] >= ORACLE_FRACTION_TARGET * last["oracle"]
    return result


def write_curves(run_dir: Path, result: dict[str, Any]) -> None:
    """The report's curve files (``streamtrain/report/curves.py``) for this run's windows."""
    ctcvr = {w["rows"]: w for w in result["ctcvr"]["windows"]}
    for name in ("oracle", "mf", "prior", "meanpool"):
        writer = CurveWriter(run_dir / (ORACLE_FILE if name == "oracle" else BASELINES_FILE), name)
        for w in result["ctr"]["windows"]:
            if name in w:
                writer.append(w["rows"], w[name], ctcvr.get(w["rows"], {}).get(name))


def plot(results: dict[int, dict[str, Any]], path: Path) -> None:
    """Learning curves (window CTR AUC over rows) of every scorer, one panel per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (seed, result) in zip(axes[0], results.items()):
        windows = result["ctr"]["windows"]
        rows = [w["rows"] for w in windows]
        for name, style in (("oracle", "k--"), ("model", "C0-"), ("mf", "C1-"), ("meanpool", "C2-"), ("prior", "C7:")):
            if windows and name in windows[0]:
                ax.plot(rows, [w[name] for w in windows], style, label=name)
        ax.set(title=f"seed {seed}: window CTR AUC", xlabel="exposure rows trained", ylabel="AUC")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- one seed
def run_seed(args: Any, seed: int, work: Path, demo: DemoSetup | None) -> dict[str, Any]:
    started = time.perf_counter()
    topic = f"quality-{seed}-{time.time_ns()}"
    base = read_demo_config() if demo is None else demo.demo
    layers = [] if demo is None else [{"kafka": {"bootstrap_servers": demo.broker.bootstrap_servers, "topic": topic,
                                                 "dlq_topic": f"{topic}.dlq"}}]
    config = stream_config(base, args.exposures, seed, args.overrides, {"run_dir": str(work / f"seed{seed}")}, *layers)
    pooled_config = stream_config(base, args.exposures, seed, args.overrides, MEANPOOL,
                                  {"run_dir": str(work / f"seed{seed}-meanpool"), "kafka": {"group_id": f"{topic}-meanpool"}},
                                  *layers)
    if demo is None:
        logs, truth = simulate_offline(config)
        runs = [train_offline(config, logs)] + ([] if args.no_meanpool else [train_offline(pooled_config, logs)])
    else:
        truth = produce(config)
        runs = [train_daemon(config)] + ([] if args.no_meanpool else [train_daemon(pooled_config)])
    columns, rows, rate, trainer, history = runs[0]
    pooled = Exposures.of(runs[1][0]) if len(runs) > 1 else None
    result = evaluate(Exposures.of(columns), truth, args.mf_lrs, args.window, pooled)
    tail = rows.losses[len(rows.losses) - len(rows.losses) // 5:]
    result |= {"seed": seed, "trained_rows": len(columns["sample_id"]), "samples_per_s": rounded(rate, 1),
               "losses_last_20pct": {k: rounded(float(np.mean([s[k] for s in tail])), 4) for k in tail[0]},
               "retrieval": retrieval_metrics(trainer, history, config.joiner.gap_bucket_edges_ms),
               "run_dir": str(config.run_dir), "wall_s": rounded(time.perf_counter() - started, 1)}
    write_curves(config.run_dir, result)
    c, v = result["ctr"], result["ctcvr"]
    for name in ("second_half", "last_20pct"):
        pool = f" meanpool {c[name]['meanpool']:.4f}" if "meanpool" in c[name] else ""
        print(f"seed {seed} {name:>11}: CTR model {c[name]['model']:.4f} mf {c[name]['mf']:.4f} (lr {c[name]['mf_lr']}) "
              f"prior {c[name]['prior']:.4f}{pool} oracle {c[name]['oracle']:.4f} | CTCVR model {v[name]['model']:.4f} "
              f"mf {v[name]['mf']:.4f} oracle {v[name]['oracle']:.4f}", flush=True)
    hr = result["retrieval"]
    if "model" in hr:
        print(f"seed {seed} retrieval ({hr['users']} users, {hr['items']} items): model hr@50 {hr['model']['hr@50']:.3f} "
              f"ndcg@50 {hr['model']['ndcg@50']:.3f} | popularity hr@50 {hr['popularity']['hr@50']:.3f} "
              f"ndcg@50 {hr['popularity']['ndcg@50']:.3f}", flush=True)
    return result


def summarise(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Top-level figures: the last 20 % of rows, averaged over seeds."""
    def mean(task: str, scorer: str) -> float | None:
        values = [r[task]["last_20pct"].get(scorer) for r in results.values()]
        return None if any(v is None for v in values) else rounded(float(np.mean(values)), 4)

    out = {"ctr_auc": mean("ctr", "model"), "oracle_ctr_auc": mean("ctr", "oracle"), "mf_auc": mean("ctr", "mf"),
           "prior_auc": mean("ctr", "prior"), "meanpool_auc": mean("ctr", "meanpool"),
           "ctcvr_auc": mean("ctcvr", "model"), "oracle_ctcvr_auc": mean("ctcvr", "oracle"),
           "mf_ctcvr_auc": mean("ctcvr", "mf"), "meanpool_ctcvr_auc": mean("ctcvr", "meanpool"),
           "rows": min(r["rows"] - slices(r["rows"])["last_20pct"].start for r in results.values())}
    out["ratio"] = rounded(out["ctr_auc"] / out["oracle_ctr_auc"], 4) if out["ctr_auc"] and out["oracle_ctr_auc"] else None
    out["all_targets_met"] = all(v for r in results.values() for v in r["targets"].values() if isinstance(v, bool))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cli = parser(__doc__, "one seed of 100k exposures instead of seeds 0-2 of 600k")
    cli.add_argument("--seeds", type=int, nargs="+", help="simulator seeds (default: 0, or 0 1 2 in the full run)")
    cli.add_argument("--exposures", type=int, help="exposures per seed (default: 100k quick, 600k full)")
    cli.add_argument("--offline", action="store_true", help="no Kafka, no daemon: the pipeline and trainer in process")
    cli.add_argument("--no-meanpool", action="store_true", help="skip the mean-pooled-history model (halves the time)")
    cli.add_argument("--window", type=int, default=10_000, help="rows per AUC window (default 10000)")
    cli.add_argument("--mf-lrs", type=float, nargs="+", default=list(MF_LRS), help="the MF learning-rate grid")
    cli.add_argument("--plot", type=Path, help="where the learning-curve PNG goes (default: the first seed's run dir)")
    cli.add_argument("--keep", type=Path, help="run directories here (default: a temporary directory, removed)")
    cli.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = cli.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.exposures = args.exposures or sizes.exposures
    seeds = tuple(args.seeds or sizes.seeds)
    if args.quick:
        announce_quick({"exposures": args.exposures, "seeds": seeds})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = args.keep or Path(tmp)
        if args.offline:
            results = {seed: run_seed(args, seed, work, None) for seed in seeds}
        else:
            with EmbeddedBroker() as broker:
                demo = DemoSetup.load(broker, [])
                results = {seed: run_seed(args, seed, work, demo) for seed in seeds}
        png = args.plot or Path(results[seeds[0]]["run_dir"]) / "quality.png"
        plot(results, png)
        print(f"learning curves: {png}", flush=True)
    print_result({"benchmark": "quality", "quick": args.quick, "offline": args.offline, "overrides": args.overrides,
                  **summarise(results), "seeds": results, "exposures": args.exposures, "window": args.window,
                  "mf_lrs": list(args.mf_lrs), "wall_s": rounded(time.perf_counter() - started, 1),
                  "machine": machine_info(with_torch=True)})


if __name__ == "__main__":
    main()
