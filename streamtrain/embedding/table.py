"""The dynamic embedding table: unbounded int64 ids -> trained rows, collision-free.

Rows live in one preallocated value tensor ``weight`` (R, D); a :class:`TensorHashMap`
maps each admitted key to its row. Two rows are reserved: ``PAD_ROW`` (0) is the zero
vector of id 0 and is never updated; ``DEFAULT_ROW`` (1) is what ids without a row read
(zero, or a learned "unknown" embedding). Keys get rows ``>= RESERVED_ROWS``.

One training step, as the module wrapper drives it::

    hit = table.lookup(ids, train=True, now_ms=t)   # admit, insert, evict if full, pin rows
    ... forward / backward on table.weight[hit.rows] ...
    table.apply_gradients([(hit.rows, grad)])       # row-wise update, periodic eviction

Determinism (exactly-once replays need it): keys are processed in sorted order, new
rows are the lowest free row indices, initial rows are a hash of (seed, key), eviction
ties go to the lower row, and the clock is the caller's event time. So a table restored
from :meth:`state_dict` continues bit-identically to the one that wrote it (on CUDA, also
set ``torch.use_deterministic_algorithms(True)``: float scatter-adds use atomics there).
The cold tier is versioned by :attr:`step` (see :meth:`EmbeddingTable._install`), so a
replay from a checkpoint reads back the same spilled rows the original run read.

Hazards: ``lookup(train=True)`` syncs the device a few times (counts of new keys);
rows handed out by a training lookup are pinned -- never evicted -- until
:meth:`apply_gradients` ends the step, so a pending gradient never lands on a row that
another key took over.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

import torch

from streamtrain.embedding.admission import CountMinSketch
from streamtrain.embedding.cold_tier import ColdTier, RecordCodec
from streamtrain.embedding.config import EmbeddingTableConfig
from streamtrain.embedding.delta import EmbeddingDelta
from streamtrain.embedding.eviction import periodic_victims, room_victims
from streamtrain.embedding.hashing import uniform_rows
from streamtrain.embedding.hashmap import TOMBSTONE, TensorHashMap
from streamtrain.embedding.optim import gather_rows, make_row_optimizer
from streamtrain.embedding.unique import unique_inverse_counts

PAD_ROW: Final = 0
DEFAULT_ROW: Final = 1
RESERVED_ROWS: Final = 2
FORMAT_VERSION: Final = 1
_ROW_STATE: Final = ("row_keys", "freq", "last_seen_ms", "touched")


@dataclass
class TableCounters:
    """Monotonic counters since the table was created (checkpointed)."""

    lookups: int = 0  # ids looked up by training lookups
    admissions: int = 0  # keys that got a row (fresh or restored from the cold tier)
    rejections: int = 0  # keys that passed admission but found no row (full, nothing evictable)
    evictions: int = 0  # rows freed by an eviction policy
    spills: int = 0  # evicted rows written to the cold tier
    cold_hits: int = 0  # admitted keys whose row came back from the cold tier
    cold_misses: int = 0  # admitted keys the cold tier did not have
    grows: int = 0  # times the row storage was enlarged


@dataclass(frozen=True)
class Lookup:
    """Where a batch of ids reads: ``table.weight[rows][inverse]`` has shape ids.shape + (D,).

    ``rows`` are unique, start with ``(PAD_ROW, DEFAULT_ROW)`` and then the admitted rows,
    so a gradient w.r.t. ``weight[rows]`` is already coalesced per row.
    """

    rows: torch.Tensor  # (U,) int64, unique
    inverse: torch.Tensor  # ids.shape int64, indices into rows


class EmbeddingTable:
    """See the module docstring. ``cold_tier``: where evicted rows go (None: dropped)."""

    def __init__(self, config: EmbeddingTableConfig, device: torch.device | str = "cpu", cold_tier: ColdTier | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        self.cold_tier = cold_tier
        self.optimizer = make_row_optimizer(config.optimizer)
        self.counters = TableCounters()
        self.step = 0  # training steps ended by apply_gradients
        self.clock_ms = 0  # max event time passed to training lookups (monotonic)
        rows = RESERVED_ROWS + config.initial_rows
        self.weight = torch.zeros(rows, config.dim, device=self.device)  # (R, D)
        self.slots = self.optimizer.new_slots(rows, config.dim, self.device)  # name -> (R, D) | (R,)
        self.row_keys = torch.zeros(rows, dtype=torch.int64, device=self.device)  # (R,) 0 = free/reserved
        self.freq = torch.zeros(rows, dtype=torch.int64, device=self.device)  # (R,) LFU score
        self.last_seen_ms = torch.zeros(rows, dtype=torch.int64, device=self.device)  # (R,) LRU/TTL score
        self.touched = torch.zeros(rows, dtype=torch.bool, device=self.device)  # (R,) changed since last delta
        self._tombstones: list[torch.Tensor] = []  # keys evicted since the last delta
        self._pinned: list[torch.Tensor] = []  # rows handed out this step
        self._reserved = torch.arange(RESERVED_ROWS, device=self.device)  # (PAD_ROW, DEFAULT_ROW)
        adm = config.admission
        self.sketch = CountMinSketch(adm.sketch_width, adm.sketch_depth, self.device) if adm.min_count > 1 else None
        self._codec = RecordCodec(
            {"weight": (torch.float32, (config.dim,)), "freq": (torch.int64, ())}
            | {f"slot.{n}": (s.dtype, (config.dim,) if s.per_element else ()) for n, s in self.optimizer.slot_specs.items()}
        )
        self._rebuild_index()

    # ------------------------------------------------------------------ metrics
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def size(self) -> int:
        """Keys that have a row."""
        return self._map.size

    @property
    def capacity(self) -> int:
        """Rows allocated for keys (grows up to ``max_rows``)."""
        return self.weight.shape[0] - RESERVED_ROWS

    @property
    def load_factor(self) -> float:
        """size / max_rows: 1.0 means admissions now evict."""
        return self.size / self.config.max_rows

    @property
    def hash_load_factor(self) -> float:
        return self._map.load_factor

    @property
    def nbytes(self) -> int:
        """Bytes held by the table (rows, slots, scores, hash map, sketch)."""
        tensors = [self.weight, *self.slots.values(), self.row_keys, self.freq, self.last_seen_ms, self.touched, self._free]
        return sum(t.nbytes for t in tensors) + self._map.nbytes + (self.sketch.nbytes if self.sketch else 0)

    # ------------------------------------------------------------------ lookups
    def lookup(self, ids: torch.Tensor, *, train: bool, now_ms: int | None = None) -> Lookup:
        """Resolve ids (any shape, int64) to rows.

        train=True counts the ids towards admission, creates rows for keys that qualify
        (evicting when full), updates frequency/recency scores with ``now_ms`` (event
        time; defaults to the latest seen) and pins the rows until the step ends.
        train=False changes nothing: scoring a batch never admits its ids.
        """
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {ids.dtype}")
        keys, inverse, counts = unique_inverse_counts(ids.reshape(-1).to(self.device))  # (U,)
        if keys.numel() and int(keys[0]) == TOMBSTONE:
            raise ValueError(f"id {TOMBSTONE} (int64 min) is reserved")
        rows = self._map.lookup(keys)  # (U,) -1 where absent
        admitted = rows >= 0  # (U,)
        present = admitted.nonzero().squeeze(1)  # (A,) positions in keys of the keys with a row
        present_rows = rows.index_select(0, present)  # (A,)
        if train:
            if now_ms is not None:
                self.clock_ms = max(self.clock_ms, int(now_ms))  # late events must not move recency back
            self._pinned.append(present_rows)
            with_new = self._admit(keys, counts, rows)
            if with_new is not rows:  # some keys got rows: recompute what depends on which did
                rows, admitted = with_new, with_new >= 0
                present = admitted.nonzero().squeeze(1)
                present_rows = rows.index_select(0, present)
            self.freq.index_add_(0, present_rows, counts.index_select(0, present))
            self.last_seen_ms.index_fill_(0, present_rows, self.clock_ms)
            self.counters.lookups += ids.numel()
        # Unique rows: pad and default first, then the admitted rows in key order.
        position = torch.where(admitted, admitted.cumsum(0) + (RESERVED_ROWS - 1), (keys != 0).long())
        unique_rows = torch.cat([self._reserved, present_rows])
        return Lookup(unique_rows, position.index_select(0, inverse).view(ids.shape))

    def embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (U,) -> a detached copy of their vectors (U, D)."""
        return gather_rows(self.weight, rows)

    # ------------------------------------------------------------------ training step
    def apply_gradients(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float | None = None) -> None:
        """Apply one step's gradients and end the step.

        parts: ``(lookup.rows (U,), grad (U, D))`` per training lookup of this step.
        Gradients of several lookups are summed per row; the pad row never trains and
        the default row trains only when ``default_row="learned"``. Then the step ends:
        pins are released and the periodic sketch halving and eviction run.
        """
        if parts:
            if len(parts) == 1:
                rows, grad = parts[0]  # rows of one lookup are unique already
            else:
                rows, inverse = torch.unique(torch.cat([r for r, _ in parts]), return_inverse=True)
                grad = torch.zeros(rows.numel(), self.dim, device=self.device).index_add_(0, inverse, torch.cat([g for _, g in parts]))
            # Lookup rows (and their sorted union) start with PAD_ROW, DEFAULT_ROW: slice them off.
            if rows.numel() < RESERVED_ROWS or not torch.equal(rows[:RESERVED_ROWS], self._reserved):
                raise ValueError("apply_gradients takes the rows of a Lookup")
            first = DEFAULT_ROW if self.config.default_row == "learned" else RESERVED_ROWS
            rows, grad = rows[first:], grad[first:]
            self.optimizer.step(self.weight, self.slots, rows, grad, self.config.optimizer.lr if lr is None else lr)
            self.touched.index_fill_(0, rows, True)
        self._end_step()

    def _end_step(self) -> None:
        self.step += 1
        self._pinned.clear()
        adm, ev = self.config.admission, self.config.eviction
        if self.sketch is not None and adm.halve_every_n_steps and self.step % adm.halve_every_n_steps == 0:
            self.sketch.halve()
        if ev.lfu_halve_every_n_steps and self.step % ev.lfu_halve_every_n_steps == 0:
            self.freq.bitwise_right_shift_(1)
        if ev.every_n_steps and self.step % ev.every_n_steps == 0:
            live = self.row_keys != 0
            self._evict(periodic_victims(ev, self.freq, self.last_seen_ms, live, self.clock_ms, self.size, self.config.max_rows))

    # ------------------------------------------------------------------ admission
    def _admit(self, keys: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Give rows to absent keys that pass admission; returns the updated rows (U,)
        (``rows`` itself when no key is absent: the caller reuses what it derived from them)."""
        missing = ((rows < 0) & (keys != 0)).nonzero().squeeze(1)  # (M,) positions in keys
        if missing.numel() == 0:
            return rows
        if self.sketch is not None:
            estimate = self.sketch.add(keys.index_select(0, missing), counts.index_select(0, missing))
            missing = missing[estimate >= self.config.admission.min_count]
        new_rows = self._allocate(missing.numel())
        self.counters.rejections += missing.numel() - new_rows.numel()
        missing = missing[: new_rows.numel()]  # short of rows: the lowest keys win (deterministic)
        self._install(keys.index_select(0, missing), new_rows)
        self._pinned.append(new_rows)
        return rows.index_copy(0, missing, new_rows)

    def _allocate(self, n: int) -> torch.Tensor:
        """Up to n free rows (lowest indices first): grow, else evict, else fewer."""
        if self._free.numel() < n:
            self._grow(n)
        if self._free.numel() < n:
            evictable = self.row_keys != 0
            for pinned in self._pinned:
                evictable.index_fill_(0, pinned, False)
            ev = self.config.eviction
            self._evict(room_victims(ev, self.freq, self.last_seen_ms, evictable, n, self.size, self.config.max_rows))
        got = min(n, self._free.numel())
        rows, self._free = self._free[:got], self._free[got:]
        return rows

    def _grow(self, n: int) -> None:
        old = self.capacity
        new = min(self.config.max_rows, max(math.ceil(old * self.config.growth_factor), self.size + n))
        if new <= old:
            return
        extra = new - old

        def extend(t: torch.Tensor, fill: float) -> torch.Tensor:
            return torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype, device=self.device)])

        self.weight = extend(self.weight, 0.0)
        self.slots = {name: extend(t, self.optimizer.slot_specs[name].fill) for name, t in self.slots.items()}
        self.row_keys, self.freq, self.last_seen_ms, self.touched = (
            extend(t, 0) for t in (self.row_keys, self.freq, self.last_seen_ms, self.touched)
        )
        self._free = torch.cat([self._free, torch.arange(RESERVED_ROWS + old, RESERVED_ROWS + new, device=self.device)])
        self.counters.grows += 1

    def _install(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Bind keys (K,) to fresh rows (K,): restored from the cold tier, else initialised."""
        if keys.numel() == 0:
            return
        self._map.insert(keys, rows)
        self.row_keys.index_copy_(0, rows, keys)
        self.optimizer.reset_rows(self.slots, rows)
        self.freq.index_fill_(0, rows, 0)
        self.touched.index_fill_(0, rows, True)
        fresh_rows, fresh_keys = rows, keys  # those not restored from the cold tier
        if self.cold_tier is not None:
            # Read at this step: the newest record <= step is the key's latest spill before
            # now. Spills happen at the step they run in (room eviction, before any read of
            # the key this step) or at step+1 (the periodic pass in _end_step, after the
            # increment); a key read now stays pinned to the end of the step. So per key, all
            # writes <= step precede this read and all later ones follow it, in every run.
            found, values = self._codec.decode(self.cold_tier.get(keys.tolist(), self.step), self.device)
            back = rows[found]
            self.weight.index_copy_(0, back, values["weight"])
            self.freq.index_copy_(0, back, values["freq"])
            for name, slot in self.slots.items():
                slot.index_copy_(0, back, values[f"slot.{name}"])
            hits = back.numel()
            self.counters.cold_hits += hits
            self.counters.cold_misses += keys.numel() - hits
            fresh = (~found).nonzero().squeeze(1)
            fresh_rows, fresh_keys = rows.index_select(0, fresh), keys.index_select(0, fresh)
        cfg = self.config
        self.weight.index_copy_(0, fresh_rows, uniform_rows(fresh_keys, cfg.dim, cfg.init_bound, cfg.seed))
        self.counters.admissions += keys.numel()

    # ------------------------------------------------------------------ eviction
    def _evict(self, rows: torch.Tensor) -> None:
        """Free rows (V,): spill them to the cold tier, drop their keys, leave tombstones."""
        if rows.numel() == 0:
            return
        keys = self.row_keys.index_select(0, rows)
        if self.cold_tier is not None:
            values = {"weight": gather_rows(self.weight, rows), "freq": gather_rows(self.freq, rows)}
            values |= {f"slot.{n}": gather_rows(s, rows) for n, s in self.slots.items()}
            self.cold_tier.put(keys.tolist(), self._codec.encode(values), self.step)  # version: see _install
            self.counters.spills += rows.numel()
        self._map.remove(keys)
        self.row_keys.index_fill_(0, rows, 0)
        self.touched.index_fill_(0, rows, False)
        self._tombstones.append(keys)
        self._free = torch.sort(torch.cat([self._free, rows])).values
        self.counters.evictions += rows.numel()

    # ------------------------------------------------------------------ delta
    def take_delta(self) -> EmbeddingDelta:
        """Rows changed and keys evicted since the previous call; resets both."""
        rows = (self.touched & (self.row_keys != 0)).nonzero().squeeze(1)
        deleted = torch.unique(torch.cat([*self._tombstones, self.row_keys[:0]]))
        deleted = deleted[self._map.lookup(deleted) < 0]  # re-admitted keys are upserts
        delta = self._delta(rows, deleted)
        self.touched.zero_()
        self._tombstones.clear()
        return delta

    def snapshot(self) -> EmbeddingDelta:
        """Every live row, no tombstones (a full dump for a fresh serving store); resets nothing."""
        return self._delta((self.row_keys != 0).nonzero().squeeze(1), self.row_keys[:0])

    def _delta(self, rows: torch.Tensor, deleted: torch.Tensor) -> EmbeddingDelta:
        return EmbeddingDelta(
            table=self.config.name,
            step=self.step,
            keys=self.row_keys[rows].cpu().numpy(),
            rows=self.weight[rows].cpu().numpy(),
            deleted=deleted.cpu().numpy(),
            default_row=self.weight[DEFAULT_ROW].cpu().numpy().copy(),
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A copy of the whole state: tensors (on CPU) and ints under stable names."""
        tensors = {"weight": self.weight, **{f"slot.{n}": t for n, t in self.slots.items()}}
        tensors |= {name: getattr(self, name) for name in _ROW_STATE}
        tensors["tombstones"] = torch.cat([*self._tombstones, self.row_keys[:0]])
        if self.sketch is not None:
            tensors["sketch.counts"] = self.sketch.counts
        state: dict[str, Any] = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        state |= {"format_version": FORMAT_VERSION, "dim": self.dim, "step": self.step, "clock_ms": self.clock_ms}
        state |= {f"counters.{k}": v for k, v in asdict(self.counters).items()}
        return state

    def load_snapshot(self, snapshot: EmbeddingDelta) -> None:
        """Hold exactly a snapshot's keys, rows and default row (a scoring copy of a
        published model): lookups of those keys read those rows; optimizer slots and
        frequency/recency scores start fresh (step, counters and the admission sketch are
        kept: scoring never reads them). Raises ``ValueError`` if it does not fit."""
        n = len(snapshot.keys)
        if snapshot.rows.shape != (n, self.dim) or n > self.config.max_rows or len(snapshot.deleted):
            raise ValueError(f"embedding table {self.config.name!r}: snapshot of {n} rows x {snapshot.rows.shape[1:]} "
                             f"(with {len(snapshot.deleted)} tombstones) does not fit dim {self.dim} / max_rows "
                             f"{self.config.max_rows}")
        rows = RESERVED_ROWS + max(n, self.config.initial_rows)
        state = self.state_dict()
        weight = torch.zeros(rows, self.dim)
        weight[DEFAULT_ROW] = torch.from_numpy(snapshot.default_row)
        weight[RESERVED_ROWS : RESERVED_ROWS + n] = torch.from_numpy(snapshot.rows)
        keys = torch.zeros(rows, dtype=torch.int64)
        keys[RESERVED_ROWS : RESERVED_ROWS + n] = torch.from_numpy(snapshot.keys)
        slots = self.optimizer.new_slots(rows, self.dim, torch.device("cpu"))
        state |= {"weight": weight, "row_keys": keys, **{f"slot.{k}": v for k, v in slots.items()},
                  "freq": torch.zeros(rows, dtype=torch.int64), "last_seen_ms": torch.zeros(rows, dtype=torch.int64),
                  "touched": torch.zeros(rows, dtype=torch.bool), "tombstones": keys[:0]}
        self.load_state_dict(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the hash map and free list are rebuilt.

        Raises ``ValueError`` if the state does not fit this table's config.
        """
        _validate_state(state, self)

        def put(name: str) -> torch.Tensor:
            return state[name].to(self.device, copy=True)

        self.weight = put("weight")
        self.slots = {n: put(f"slot.{n}") for n in self.optimizer.slot_specs}
        for name in _ROW_STATE:
            setattr(self, name, put(name))
        self._tombstones = [put("tombstones")]
        if self.sketch is not None:
            self.sketch.counts = put("sketch.counts")
        self.step, self.clock_ms = int(state["step"]), int(state["clock_ms"])
        self.counters = TableCounters(**{f.name: int(state[f"counters.{f.name}"]) for f in fields(TableCounters)})
        self._pinned = []
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Derive the hash map and the free list from ``row_keys``."""
        live = (self.row_keys != 0).nonzero().squeeze(1)
        self._map = TensorHashMap(self.capacity, self.config.hash_max_load, self.device)
        self._map.insert(self.row_keys[live], live)
        self._free = (self.row_keys[RESERVED_ROWS:] == 0).nonzero().squeeze(1) + RESERVED_ROWS


def _validate_state(state: Mapping[str, Any], table: EmbeddingTable) -> None:
    def fail(why: str) -> None:
        raise ValueError(f"embedding table {table.config.name!r}: cannot load state: {why}")

    if state.get("format_version") != FORMAT_VERSION:
        fail(f"format_version {state.get('format_version')!r}, expected {FORMAT_VERSION}")
    if state.get("dim") != table.dim:
        fail(f"dim {state.get('dim')}, table has {table.dim}")
    slot_names = {k[5:] for k in state if k.startswith("slot.")}
    if slot_names != set(table.optimizer.slot_specs):
        fail(f"optimizer slots {sorted(slot_names)}, {table.config.optimizer.kind} needs {sorted(table.optimizer.slot_specs)}")
    rows = state["weight"].shape[0]
    if state["weight"].shape != (rows, table.dim) or not RESERVED_ROWS <= rows <= RESERVED_ROWS + table.config.max_rows:
        fail(f"weight shape {tuple(state['weight'].shape)} does not fit dim {table.dim} / max_rows {table.config.max_rows}")
    for name in (*_ROW_STATE, *(f"slot.{n}" for n in slot_names)):
        if state[name].shape[0] != rows:
            fail(f"{name} has {state[name].shape[0]} rows, weight has {rows}")
    weight = state["weight"]
    if weight[PAD_ROW].any() or (table.config.default_row == "zero" and weight[DEFAULT_ROW].any()):
        fail("the pad row (and with default_row='zero' the default row) must be zero")
    keys = state["row_keys"]
    live = keys[keys != 0]
    if keys[:RESERVED_ROWS].any() or (live == TOMBSTONE).any() or torch.unique(live).numel() != live.numel():
        fail("row_keys must be unique, non-reserved, and 0 on the reserved rows")
    if (table.sketch is None) != ("sketch.counts" not in state):
        fail("admission sketch present in only one of state and config")
    if table.sketch is not None and state["sketch.counts"].shape != table.sketch.counts.shape:
        fail(f"sketch shape {tuple(state['sketch.counts'].shape)}, config wants {tuple(table.sketch.counts.shape)}")
