"""One timing of ``Trainer.step`` on real batches, in whatever checkout is first on ``sys.path``.

    python bench/trainer_child.py demo|default WARMUP TIMED [EXPOSURES [THREADS]]

Run by ``bench.trainer`` as a subprocess, for this checkout and, with ``--against REV``, for
another revision's checkout: so it imports nothing from ``bench`` and adapts to the API of
the revision it runs in (older revisions cut fixed-size batches inside ``IngestPipeline``
and named the demo settings ``DEMO_DEFAULTS``). It builds its own batches from the same
seeded simulator events with that revision's own joiner (the sample format may differ
between revisions), trains ``WARMUP`` batches untimed (histories and tables warm up),
then times ``TIMED`` steps. Prints one JSON object: samples/s (wall clock, and per CPU second of
this process: on a shared machine waiting for a core inflates the first, not the second), ms
per step, batch size.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import zlib

import torch


def demo_layers() -> dict:
    from streamtrain.cli import demo_cmd

    return demo_cmd.demo_defaults() if hasattr(demo_cmd, "demo_defaults") else demo_cmd.DEMO_DEFAULTS


def config(which: str, exposures: int):
    from streamtrain.config import build_config

    base = demo_layers() if which == "demo" else {}
    sim = {"simulator": {**(base.get("simulator") or {}), "exposures": exposures, "rate": 0, "time_scale": 0,
                         "users": 500, "items": 1000}}
    return build_config(base, sim)


def batches(cfg, limit: int) -> list[dict]:
    """The first ``limit`` training batches of the demo world's stream, cut by this revision."""
    from consumers.decode import EventDecoder
    from consumers.joiner import LabelJoiner
    from consumers.pipeline import IngestPipeline
    from consumers.popularity import InProcessPopularity
    from consumers.testing import ListDlqSink, ListSource
    from streamtrain.simulator.stream import EventStream

    logs: dict[int, list[bytes]] = {0: [], 1: []}
    for event in EventStream(cfg.simulator):
        logs[zlib.crc32(event.key) % 2].append(event.value)
    ingest = cfg.ingest()
    parts = (ListSource(logs), EventDecoder(ingest.decoder, ingest.joiner.sparse_features, ingest.joiner.dense_features),
             LabelJoiner(ingest.joiner, InProcessPopularity(ingest.popularity)), ListDlqSink())
    size = cfg.trainer.batch_size
    if "batch_size" in inspect.signature(IngestPipeline).parameters:  # older revisions cut batches here
        pipeline, buffer = IngestPipeline(*parts, batch_size=size), None
    else:
        from consumers.batching import SampleBuffer

        pipeline, buffer = IngestPipeline(*parts), SampleBuffer(size)
    out: list[dict] = []
    source = parts[0]
    while source.remaining() and len(out) < limit:
        polled = pipeline.poll(2000)
        if buffer is None:
            out += polled
            continue
        for samples in polled:
            buffer.extend(samples)
        while (batch := buffer.pop_batch()) is not None:
            out.append({k: v.copy() for k, v in batch.items()})
    return [b for b in out if len(b["sample_id"]) == size][:limit]


def trainer(cfg):
    from streamtrain.trainer import Trainer

    tables = {name: getattr(cfg.embeddings, name) for name in ("item", "user", "sparse")}
    return Trainer(cfg.model, tables, learning_rate=cfg.trainer.learning_rate, seed=cfg.trainer.seed,
                   device=torch.device("cpu"))


def main() -> None:
    which, warmup, timed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    exposures = int(sys.argv[4]) if len(sys.argv) > 4 else 60_000
    torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)  # the daemon's default (trainer.threads): 1
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the daemon runs it
    cfg = config(which, exposures)
    data = batches(cfg, warmup + timed)
    if len(data) < warmup + timed:
        raise SystemExit(f"only {len(data)} batches from {exposures} exposures; need {warmup + timed}")
    model = trainer(cfg)
    for batch in data[:warmup]:
        model.step(batch)
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in data[warmup:]:
        model.step(batch)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    size = cfg.trainer.batch_size
    print(json.dumps({"config": which, "samples_per_s": size * timed / elapsed, "step_ms": 1000 * elapsed / timed,
                      "cpu_samples_per_s": size * timed / cpu,
                      "batch_size": size, "steps": timed, "threads": torch.get_num_threads(), "mean_hist_len": float(sum(b["hist_len"].mean() for b in data[warmup:]) / timed)}))


if __name__ == "__main__":
    main()
