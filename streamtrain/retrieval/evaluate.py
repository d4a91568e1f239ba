"""Leave-last-out retrieval metrics: HR@K and NDCG@K of the retrieval head against all items.

For every user whose history (the joiner's per-user ring, in a checkpoint) holds a click,
the last click is held out: the user vector is computed from the events strictly before
that item's exposure (retrieval decides what to expose, so it never sees it), every item
with a row in the item table is scored by inner product (FAISS, exact), and the rank of
the held-out item gives

    HR@K   = share of users whose item is in their top K
    NDCG@K = mean over users of 1 / log2(rank + 2) when rank < K, else 0   (rank 0-based)

Items are not filtered by what the user has seen before (users here re-see items). The
popularity baseline ranks every item by how often it occurs in all users' histories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from consumers.schema import SAMPLE_FIELDS, Action, SampleBatch, empty_batch
from consumers.timefeatures import GapBuckets, calendar
from streamtrain.retrieval.index import RetrievalIndex
from streamtrain.trainer import Trainer

DEFAULT_KS = (10, 50, 200)


@dataclass(frozen=True)
class HeldOut:
    """One held-out click per user and the history before it (right-aligned, 0-padded)."""

    user: np.ndarray  # (U,) int64
    item: np.ndarray  # (U,) int64: the held-out clicked item
    ts: np.ndarray  # (U,) int64: its exposure time (the retrieval moment)
    hist_items: np.ndarray  # (U, L) int64
    hist_actions: np.ndarray  # (U, L) int64
    hist_ts: np.ndarray  # (U, L) int64

    def __len__(self) -> int:
        return len(self.user)


def leave_last_out(users: np.ndarray, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> HeldOut:
    """From history rings (U, L) right-aligned: each user's last click, with the events
    before its exposure (before the click itself when no exposure of it is in the ring).
    Users without a click, or with nothing before it, are left out."""
    length = items.shape[1]
    kept: list[tuple[int, int, np.ndarray]] = []  # (ring row, position of the retrieval moment, context positions)
    for u in range(len(users)):
        clicks = np.flatnonzero(actions[u] == int(Action.CLICK))
        if not len(clicks):
            continue
        c = clicks[-1]
        exposures = np.flatnonzero((items[u, :c] == items[u, c]) & (actions[u, :c] == int(Action.EXPOSURE)))
        cut = exposures[-1] if len(exposures) else c  # the retrieval moment: the exposure of the item
        before = np.flatnonzero((ts[u] < ts[u, cut]) & (actions[u] != 0))
        if len(before):
            kept.append((u, cut, before))
    rows = np.array([u for u, _, _ in kept], np.int64)
    hist = np.zeros((3, len(kept), length), np.int64)  # items, actions, ts, right-aligned
    for r, (u, _, before) in enumerate(kept):
        for field, source in enumerate((items, actions, ts)):
            hist[field, r, length - len(before):] = source[u, before]
    cuts = np.array([cut for _, cut, _ in kept], np.int64)
    clicked = np.array([np.flatnonzero(actions[u] == int(Action.CLICK))[-1] for u, _, _ in kept], np.int64)
    return HeldOut(users[rows] if len(rows) else np.zeros(0, np.int64),
                   items[rows, clicked] if len(rows) else np.zeros(0, np.int64),
                   ts[rows, cuts] if len(rows) else np.zeros(0, np.int64), hist[0], hist[1], hist[2])


def hit_rate_and_ndcg(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``ranks``: (U,) 0-based rank of each user's held-out item (any value >= max(ks) when
    it is not in the top max(ks)) -> ``{"hr@K": ..., "ndcg@K": ...}``."""
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        gain = np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if len(ranks) else float("nan")
    return out


def ranks_in(found: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """found: (U, K) ids best first; targets (U,) -> 0-based rank, K where absent."""
    match = found == targets[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), found.shape[1])


def popularity_ranks(held: HeldOut, all_items: np.ndarray, k: int) -> np.ndarray:
    """Ranks of the held-out items when every user gets the same list: items by how often
    they occur in the histories (``all_items``: every history item id, 0s ignored)."""
    ids, counts = np.unique(all_items[all_items != 0], return_counts=True)
    top = ids[np.lexsort((ids, -counts))][:k]  # ties by id: deterministic
    return ranks_in(np.broadcast_to(top, (len(held), len(top))), held.item)


@torch.no_grad()
def user_vectors(trainer: Trainer, held: HeldOut, gaps: GapBuckets, batch_size: int = 1024) -> np.ndarray:
    """The retrieval head's user vectors of ``held`` (U, dim): the model's own forward on
    batches whose history is the held-out context (the target slot does not reach them:
    the user vector reads the last history position, before the target)."""
    trainer.model.eval()
    out = [trainer.model(trainer.to_tensors(scoring_batch(trainer, held, slice(i, i + batch_size), gaps)))["user_vec"]
           .float().cpu().numpy() for i in range(0, len(held), batch_size)]
    return np.concatenate(out)


def scoring_batch(trainer: Trainer, held: HeldOut, part: slice, gaps: GapBuckets) -> SampleBatch:
    """A sample batch of the held-out rows ``part``: their context as the history, the
    time features of the retrieval moment; no features, negatives or priors (zeros)."""
    ts = held.ts[part]
    cfg = trainer.model.config
    batch = empty_batch(held.hist_items.shape[1], 0, cfg.num_sparse_features, cfg.num_dense_features)
    batch = {name: np.zeros((len(ts), *column.shape[1:]), column.dtype) for name, column in batch.items()}
    hist_ts, actions = held.hist_ts[part], held.hist_actions[part]
    real = actions != 0
    hour, weekday, week = calendar(ts)
    prev = np.where(real.any(axis=1), hist_ts.max(axis=1), 0)
    batch.update(user=held.user[part], item=held.item[part], ts=ts, hist_items=held.hist_items[part],
                 hist_actions=actions, hist_ts=hist_ts, hist_len=real.sum(axis=1),
                 hist_gap_buckets=gaps(ts[:, None] - hist_ts, real), gap_bucket=gaps(ts - prev, prev > 0),
                 hour=hour, weekday=weekday, week=week)
    return {k: np.ascontiguousarray(v, SAMPLE_FIELDS[k].dtype) for k, v in batch.items()}


def evaluate(trainer: Trainer, history: dict[str, Any], gap_edges_ms: Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """HR@K / NDCG@K of the retrieval head and of popularity, on the held-out last clicks of
    a joiner's history state (``checkpoint.components["pipeline"]["joiner"]["history"]``)."""
    users, items, actions, ts = _rings(history)
    held = leave_last_out(users, items, actions, ts)
    table = trainer.tables["item"].table
    keys = table.row_keys[table.row_keys != 0]
    k = max(ks)
    result: dict[str, Any] = {"users": len(held), "items": int(keys.numel())}
    if not len(held) or not keys.numel():
        return result
    trainer.model.eval()
    with torch.no_grad():
        item_vecs = trainer.model.item_vectors(keys).float().cpu().numpy()
    index = RetrievalIndex.build(keys.cpu().numpy(), item_vecs, device="cpu")
    _, found = index.search(user_vectors(trainer, held, GapBuckets(gap_edges_ms)), min(k, len(index)))
    result["model"] = hit_rate_and_ndcg(ranks_in(found, held.item), ks)
    result["popularity"] = hit_rate_and_ndcg(popularity_ranks(held, items, k), ks)
    return result


def _rings(history: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users (U,), items, actions, ts (U, L)) of a history state (``UserHistory.state_dict``)."""
    keys = np.asarray(history["index"]["keys"], np.int64)
    users = keys[keys != 0]
    return (users, np.asarray(history["items"], np.int64), np.asarray(history["actions"], np.int64),
            np.asarray(history["ts"], np.int64))
