"""The coordinated checkpoint of a scale-out run: one manifest, every rank's share in it.

All ranks cut at the same step (the checkpoint decision is collective), send their share
to rank 0, and rank 0 writes one checkpoint through the ordinary store (temp dir, fsync,
manifest last, rename, LATEST): as crash-safe as a single writer, because it is one.
Components (``checkpoints/store.py`` names them)::

    scaleout      workers N, the partitions of each rank
    trainer       dense weights, Adam, step and sample counts  (replicated: rank 0's)
    buffer        samples emitted but not yet trained           (replicated)
    monitors      monitors and gate                              (replicated)
    ledger        sample ids trained since the parent            (rank 0)
    shard-<r>     rank r's shard of every embedding table
    pipeline-<r>  rank r's joiner state (its partitions)
    rank-<r>      rank r's torch RNG state

and the manifest's ``offsets`` hold every partition's next offset. A checkpoint of the
single-process daemon (``trainer`` with its tables and RNG, ``pipeline``) reads as a
run of one worker, so a plain run can be scaled out from its checkpoints.

Restoring on the number of workers that wrote it hands every rank its own share back
unchanged (a replay is bit-exact). On another number, :func:`split` regroups: every
table key moves to its new owner with its row, optimizer slots and scores
(``streamtrain/embedding/regroup.py``), every partition's joiner state to the rank that
now owns the partition (``consumers/reshard.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from consumers.reshard import regroup as regroup_pipelines
from streamtrain.distributed.sharded_embedding import owner_of
from streamtrain.embedding.regroup import regroup_table_states

SCALEOUT = "scaleout"
FORMAT_VERSION = 1
REPLICATED = ("buffer", "monitors")  # the same on every rank: stored once


def placement(partitions: Sequence[int], workers: int) -> list[list[int]]:
    """Static placement: partition p goes to rank p mod workers (every rank knows every
    rank's share without asking; nothing numeric depends on it, see docs/architecture.md)."""
    return [[p for p in sorted(partitions) if p % workers == rank] for rank in range(workers)]


@dataclass
class RankShare:
    """What one rank holds of the run's state."""

    tables: dict[str, dict[str, Any]]  # table name -> its shard's state
    pipeline: dict[str, Any]  # the joiner of the rank's partitions
    rng: torch.Tensor  # torch's CPU RNG state


@dataclass
class RunState:
    """A checkpoint's state as the ranks need it: what they share, and each rank's share."""

    shared: dict[str, dict[str, Any]]  # trainer (without tables and RNG), buffer, monitors
    ranks: list[RankShare]
    partitions: list[list[int]]  # of each rank


def compose(run: RunState) -> dict[str, dict[str, Any]]:
    """The components of one checkpoint manifest (ledger excluded: the caller adds it)."""
    components: dict[str, dict[str, Any]] = {
        SCALEOUT: {"format_version": FORMAT_VERSION, "workers": len(run.ranks), "partitions": run.partitions},
        **run.shared,
    }
    for r, share in enumerate(run.ranks):
        components[f"shard-{r}"] = {"format_version": FORMAT_VERSION, "tables": share.tables}
        components[f"pipeline-{r}"] = share.pipeline
        components[f"rank-{r}"] = {"format_version": FORMAT_VERSION, "rng": share.rng}
    return components


def decompose(components: Mapping[str, Mapping[str, Any]]) -> RunState:
    """Inverse of :func:`compose`; a single-process daemon's checkpoint is a run of one."""
    if SCALEOUT not in components:
        trainer = dict(components["trainer"])
        tables, rng = trainer.pop("tables"), trainer.pop("rng")
        pipeline = dict(components["pipeline"])
        shared = {"trainer": trainer, **{k: dict(components[k]) for k in REPLICATED}}
        return RunState(shared, [RankShare(dict(tables), pipeline, rng)], [sorted(pipeline["joiner"]["assigned"])])
    layout = components[SCALEOUT]
    if layout.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"scale-out checkpoint layout {layout.get('format_version')!r}, expected {FORMAT_VERSION}")
    workers = int(layout["workers"])
    shared = {k: dict(components[k]) for k in ("trainer", *REPLICATED)}
    ranks = [RankShare(dict(components[f"shard-{r}"]["tables"]), dict(components[f"pipeline-{r}"]),
                       components[f"rank-{r}"]["rng"]) for r in range(workers)]
    return RunState(shared, ranks, [[int(p) for p in ps] for ps in layout["partitions"]])


def split(run: RunState, partitions: list[list[int]], *, num_sparse: int, num_dense: int,
          table_min_rows: Mapping[str, int]) -> RunState:
    """The same state for ranks that own ``partitions`` (one list per new rank)."""
    workers = len(partitions)
    if partitions == run.partitions:
        return run  # the same placement: every rank gets its own share back, untouched
    names = sorted(run.ranks[0].tables)
    tables = {name: regroup_table_states([share.tables[name] for share in run.ranks],
                                         lambda keys: owner_of(keys, workers), workers, table_min_rows[name])
              for name in names}
    pipelines = regroup_pipelines([share.pipeline for share in run.ranks], run.partitions, partitions,
                                  num_sparse, num_dense)
    # RNG states only matter with dropout; a new rank continues an old rank's stream where there is one.
    rngs = [run.ranks[min(r, len(run.ranks) - 1)].rng for r in range(workers)]
    ranks = [RankShare({name: tables[name][r] for name in names}, pipelines[r], rngs[r]) for r in range(workers)]
    return RunState(run.shared, ranks, partitions)
