"""Sample batches as fixed-size records, to gather every rank's emitted samples in one
collective, and the merge of several joiners' emissions into the one emission order."""

from __future__ import annotations

import numpy as np
import torch

from consumers.schema import SAMPLE_FIELDS, SampleBatch, concat_batches, empty_batch
from streamtrain.distributed.comm import Comm


class SampleExchange:
    """Every rank's newly emitted samples, merged, on every rank."""

    def __init__(self, comm: Comm, history_len: int, negatives: int, sparse: int, dense: int) -> None:
        self.comm = comm
        self._empty = empty_batch(history_len, negatives, sparse, dense)
        self._record = np.dtype([(name, column.dtype, column.shape[1:]) for name, column in self._empty.items()])

    def gather(self, batches: list[SampleBatch]) -> SampleBatch:
        """Every rank's ``batches`` (each in emission order), as one batch in the emission
        order ``(emit_ms, ts, sample_id, is_correction)`` of a single joiner; partition and
        offset break the ties only a duplicated sample id could leave."""
        local = concat_batches(batches) if batches else self._empty
        records = np.empty(len(local["sample_id"]), self._record)
        for name in SAMPLE_FIELDS:
            records[name] = local[name]
        rows = torch.from_numpy(records.view(np.uint8).reshape(len(records), self._record.itemsize))
        merged = torch.cat(self.comm.all_gather_rows(rows)).numpy().reshape(-1).view(self._record)
        order = np.lexsort((merged["offset"], merged["partition"], merged["is_correction"], merged["sample_id"],
                            merged["ts"], merged["emit_ms"]))
        return {name: np.ascontiguousarray(merged[name][order]) for name in SAMPLE_FIELDS}
