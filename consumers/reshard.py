"""Regroup the pipeline states of several joiners that share a topic by partition: the
same stream consumed by a different number of joiners (scale-out ranks). No Kafka, no clocks.

``regroup(states, old, new, ...)`` takes one pipeline state per old joiner with the
partitions it owned, and returns one per new joiner for the partitions it will own.
What each part of the joiner state becomes:

* **per partition, exact**: admission (clock, anchor, quarantine with its votes, dedupe
  window), staged events, pending samples, ended partitions, and the topic-wide event-id
  window (each id is tagged with its partition) go to the partition's new owner.
* **per user, exact**: user histories are keyed by user, and a user's events all come
  from one partition (the key is the user), but a history does not record which. A
  history goes to every new joiner owning one of its old joiner's partitions; only the
  user's owner ever reads or extends it, the other copies are inert and leave by the
  usual least-recently-seen eviction. Merging keeps, per user, the copy seen last (only
  the owner changes a history, and every change moves its last-seen time forward, so
  that is the owner's; equal times mean identical copies). The exposure-key window
  (request x item x user: also per user, untagged) is routed the same way.
* **replicated, exact**: popularity counters and the item pool are kept equal on every
  joiner of the topic (``consumers/topic.py``), as are the watermark and the last
  refresh bucket: they are taken from the first state (and checked where cheap).
* **bounded**: a window merged from several joiners (event ids, exposure keys) is their
  concatenation in old-joiner order cut to its capacity, so which old ids leave first
  differs from one joiner's arrival order; only ids older than a full window are affected.
* **totals**: counters (joiner, DLQ, pipeline stats) are summed into the first new
  state, zero in the others, so the sums over joiners stay what they were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from consumers.schema import EventBatch

_STATE_FORMATS = {"pipeline": 2, "joiner": 2}


def regroup(states: Sequence[Mapping[str, Any]], old: Sequence[Sequence[int]], new: Sequence[Sequence[int]],
            num_sparse: int, num_dense: int) -> list[dict[str, Any]]:
    """One pipeline state per entry of ``new`` (its partitions), from ``states`` of the
    joiners that owned ``old``. Every partition of ``old`` must be in exactly one of
    ``new``. ``num_sparse``/``num_dense``: the event batches' feature widths."""
    if len(states) != len(old) or not states:
        raise ValueError(f"{len(states)} pipeline states for {len(old)} old partition sets")
    owned_old = sorted(p for ps in old for p in ps)
    owned_new = sorted(p for ps in new for p in ps)
    if len(set(owned_new)) != len(owned_new) or not set(owned_old) <= set(owned_new):
        raise ValueError(f"new partition sets {list(map(list, new))} must cover {owned_old} once each")
    for state in states:
        for what, version, got in (("pipeline", _STATE_FORMATS["pipeline"], state.get("format_version")),
                                   ("joiner", _STATE_FORMATS["joiner"], state["joiner"].get("format_version"))):
            if got != version:
                raise ValueError(f"{what} state format {got!r}: regroup reads format {version} (load and save it once first)")
    joiners = [s["joiner"] for s in states]
    for field in ("watermark", "bucket"):
        values = {j[field] for j in joiners}
        if len(values) > 1:
            raise ValueError(f"joiners sharing a topic disagree on {field}: {sorted(map(str, values))}")
    out = []
    for i, partitions in enumerate(new):
        mine = set(partitions)
        sources = [k for k, ps in enumerate(old) if mine & set(ps)]  # old joiners whose users may now be mine
        first = i == 0
        out.append({
            "format_version": states[0]["format_version"],
            "joiner": _joiner(joiners, mine, sources, first, num_sparse, num_dense),
            "dlq_counts": _totals([s["dlq_counts"] for s in states], first),
            "stats": _totals([s["stats"] for s in states], first),
            "ended": sorted(p for s in states for p in s["ended"] if p in mine),
        })
    return out


def _joiner(joiners: Sequence[Mapping[str, Any]], mine: set[int], sources: list[int], first: bool,
            num_sparse: int, num_dense: int) -> dict[str, Any]:
    head = joiners[0]
    finalised = [j["finalised_ts"] for j in joiners if j["finalised_ts"] is not None]
    return {
        "format_version": head["format_version"],
        "watermark": head["watermark"],
        "bucket": head["bucket"],
        "finalised_ts": max(finalised) if finalised else None,
        "assigned": sorted(mine),
        "counters": _totals([j["counters"] for j in joiners], first),
        "staged": _events([j["staged"] for j in joiners], mine, num_sparse, num_dense).state_dict(),
        "admission": _admission([j["admission"] for j in joiners], mine, num_sparse, num_dense),
        "event_ids": _window([j["event_ids"] for j in joiners], lambda ids, tags: np.isin(tags, list(mine))),
        "exposure_keys": _window([joiners[k]["exposure_keys"] for k in sources], lambda ids, tags: np.ones(len(ids), bool)),
        "pending": _pending([j["pending"] for j in joiners], mine),
        "history": _history([joiners[k]["history"] for k in sources], head["history"]),
        "item_pool": head["item_pool"],
        "popularity": head["popularity"],
    }


def _totals(counters: Sequence[Mapping[str, int]], keep: bool) -> dict[str, int]:
    names = sorted({k for c in counters for k in c})
    return {k: (sum(int(c.get(k, 0)) for c in counters) if keep else 0) for k in names}


def _events(states: Sequence[Mapping[str, Any]], mine: set[int], num_sparse: int, num_dense: int) -> EventBatch:
    """The events of ``mine``'s partitions, old joiner by old joiner (each keeps its order)."""
    batches = [EventBatch.from_state(s, num_sparse, num_dense) for s in states]
    kept = [b.take(np.isin(b.partition, list(mine))) for b in batches]
    return EventBatch.concat(kept)


def _admission(states: Sequence[Mapping[str, Any]], mine: set[int], num_sparse: int, num_dense: int) -> dict[str, Any]:
    """Held events of ``mine``'s partitions with their per-event evidence columns (the
    names the state's format version uses: ``run``/``top``/``opposed``, or format 1's ``votes``)."""
    evidence_names = [name for name in ("run", "top", "opposed", "votes") if name in states[0]]
    held: list[EventBatch] = []
    evidence: dict[str, list[np.ndarray]] = {name: [] for name in evidence_names}
    for s in states:
        batch = EventBatch.from_state(s["held"], num_sparse, num_dense)
        keep = np.isin(batch.partition, list(mine))
        held.append(batch.take(keep))
        for name in evidence_names:
            evidence[name].append(np.asarray(s[name], np.int64)[keep])
    return {
        "format_version": states[0]["format_version"],
        "partitions": {p: lane for s in states for p, lane in s["partitions"].items() if int(p) in mine},
        "held": EventBatch.concat(held).state_dict(),
        **{name: np.concatenate(columns) for name, columns in evidence.items()},
        "dedupe": {"format_version": states[0]["dedupe"]["format_version"],
                   "partitions": {p: ids for s in states for p, ids in s["dedupe"]["partitions"].items() if int(p) in mine}},
    }


def _window(states: Sequence[Mapping[str, Any]], keep: Any) -> dict[str, Any]:
    """Remembered ids (oldest first) that ``keep(ids, tags)`` selects, old joiner by old
    joiner; an id several of them hold (a copy routed to every possible owner) once."""
    ids, tags = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in states:
        i, t = np.asarray(s["ids"], np.int64), np.asarray(s["tags"], np.int64)
        mask = keep(i, t)
        ids.append(i[mask])
        tags.append(t[mask])
    all_ids, all_tags = np.concatenate(ids), np.concatenate(tags)
    first = np.sort(np.unique(all_ids, return_index=True)[1])
    return {"format_version": states[0]["format_version"] if states else 1, "ids": all_ids[first], "tags": all_tags[first]}


def _pending(states: Sequence[Mapping[str, Any]], mine: set[int]) -> dict[str, Any]:
    """Pending samples of ``mine``'s partitions, in the pool's canonical order (ts, sample id)."""
    columns: dict[str, list[np.ndarray]] = {}
    for s in states:
        cols = s["columns"]
        keep = np.isin(np.asarray(cols["partition"]), list(mine))
        for name, col in cols.items():
            columns.setdefault(name, []).append(np.asarray(col)[keep])
    merged = {name: np.concatenate(parts) for name, parts in columns.items()}
    order = np.lexsort((merged["sample_id"], merged["ts"]))
    return {"format_version": states[0]["format_version"], "dims": dict(states[0]["dims"]),
            "columns": {name: col[order] for name, col in merged.items()}}


def _history(states: Sequence[Mapping[str, Any]], head: Mapping[str, Any]) -> dict[str, Any]:
    """The users of ``states``; a user in several keeps the copy seen last."""
    users, seen, rows = [], [], []
    for s in states:
        keys = np.asarray(s["index"]["keys"], np.int64)
        used = np.flatnonzero(keys)
        users.append(keys[used])
        seen.append(np.asarray(s["index"]["last_seen"], np.int64)[used])
        rows.append({name: np.asarray(s[name]) for name in ("items", "actions", "ts", "hot", "length")})
    if not states:
        users, seen = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    all_users, all_seen = np.concatenate(users), np.concatenate(seen)
    order = np.lexsort((-all_seen, all_users))  # per user, the latest copy first
    first = np.ones(len(order), bool)
    first[1:] = all_users[order][1:] != all_users[order][:-1]
    pick = order[first]
    n = len(pick)
    allocated = max(1024, n)
    keys = np.zeros(allocated, np.int64)
    last_seen = np.zeros(allocated, np.int64)
    keys[:n], last_seen[:n] = all_users[pick], all_seen[pick]
    state: dict[str, Any] = {"format_version": head["format_version"], "history_len": head["history_len"],
                             "index": {"format_version": head["index"]["format_version"], "keys": keys,
                                       "last_seen": last_seen}}
    for name in ("items", "actions", "ts", "hot", "length"):
        parts = [r[name] for r in rows] or [np.asarray(head[name])[:0]]
        state[name] = np.concatenate(parts)[pick]
    return state
