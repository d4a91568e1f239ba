"""Columnar storage of pending samples: one preallocated array per field, rows reused.

A pending sample's features are written once, when its exposure is finalised; labels
change as clicks/conversions arrive; emitting is one fancy-index gather per field.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from consumers.schema import EMISSION_FIELDS, RANK_PACKAGE_SLOTS, SAMPLE_FIELDS, SampleBatch

FORMAT_VERSION = 2  # 2: no "indexed" column (the join index keeps every open exposure); 1 loads without it

# Joiner bookkeeping stored beside the sample fields.
_INTERNAL = {
    "key": (np.dtype(np.int64), ()),  # (request_id x item_id) pair: OpenExposures finds the row by it
    "click_ts": (np.dtype(np.int64), ()),  # ts of the attached click, -1 = none
    "emit_at": (np.dtype(np.int64), ()),  # (first) emission once the watermark is above this event time
    "closes_at": (np.dtype(np.int64), ()),  # event time after which no event can change it: released then
    "emitted": (np.dtype(np.bool_), ()),  # first emission done (emit_then_correct: may still wait for a conversion)
    "late_convert": (np.dtype(np.bool_), ()),  # emit_then_correct: a correction for this sample went out
}


class SamplePool:
    def __init__(self, history_len: int, negatives: int, sparse: int, dense: int, initial: int = 1024) -> None:
        self.dims = {"L": history_len, "K": negatives, "S": sparse, "D": dense, "P": RANK_PACKAGE_SLOTS}
        self._specs = {name: (spec.dtype, tuple(self.dims[d] for d in spec.shape))
                       for name, spec in SAMPLE_FIELDS.items() if name not in EMISSION_FIELDS}
        self._specs.update(_INTERNAL)
        self.cols: dict[str, np.ndarray] = {}
        self.live = np.zeros(0, np.bool_)
        self._free: list[int] = []
        self._resize(initial)

    def __len__(self) -> int:
        return int(self.live.sum())

    def _resize(self, rows: int) -> None:
        old = len(self.live)
        for name, (dtype, shape) in self._specs.items():
            grown = np.zeros((rows, *shape), dtype)
            if name in self.cols:
                grown[:old] = self.cols[name]
            self.cols[name] = grown
        live = np.zeros(rows, np.bool_)
        live[:old] = self.live
        self.live = live
        self._free.extend(range(rows - 1, old - 1, -1))  # popped from the end: lowest row first

    def alloc(self, n: int) -> np.ndarray:
        """``n`` fresh rows (zeroed bookkeeping is the caller's job), marked live."""
        while len(self._free) < n:
            self._resize(2 * len(self.live))
        rows = np.array(self._free[len(self._free) - n:][::-1], np.int64)
        del self._free[len(self._free) - n:]
        self.live[rows] = True
        return rows

    def release(self, rows: np.ndarray) -> None:
        self.live[rows] = False
        self._free.extend(sorted(rows.tolist(), reverse=True))

    def gather(self, rows: np.ndarray) -> SampleBatch:
        """The sample fields of ``rows`` as a new batch (copies), but the emission fields,
        which the emitter sets."""
        return {name: self.cols[name][rows] for name in SAMPLE_FIELDS if name not in EMISSION_FIELDS}

    def state_dict(self) -> dict[str, Any]:
        """The live samples in a canonical order (event time, then sample id): which row a
        sample sits in depends on the pool's history, not on its content, and a restored
        pool packs its rows anew — the state must not carry that layout."""
        rows = np.flatnonzero(self.live)
        rows = rows[np.lexsort((self.cols["sample_id"][rows], self.cols["ts"][rows]))]
        return {"format_version": FORMAT_VERSION, "dims": dict(self.dims),
                "columns": {name: col[rows] for name, col in self.cols.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(f"pending state format {state.get('format_version')!r}, expected {FORMAT_VERSION} (or 1)")
        if dict(state["dims"]) != self.dims:
            raise ValueError(f"pending state has dims {state['dims']}, config says {self.dims}")
        columns = state["columns"]
        n = len(columns["key"])
        self.cols = {}
        self.live = np.zeros(0, np.bool_)
        self._free = []
        self._resize(max(1024, 1 << max(n - 1, 0).bit_length()))
        for name, (dtype, shape) in self._specs.items():
            self.cols[name][:n] = np.asarray(columns[name], dtype).reshape((n, *shape))
        self.live[:n] = True
        self._free = list(range(len(self.live) - 1, n - 1, -1))
