"""The joiners of a scale-out run share the topic-wide state over ``torch.distributed``.

:class:`TorchTopicExchange` is the :class:`~consumers.topic.TopicExchange` of one rank:
``buckets`` is an all_gather of the refresh buckets each rank finalises, ``share`` an
all_gather of each rank's accepted events of the bucket (seven int64 columns and the push
flag: 64 bytes per event), merged into canonical order. Every rank then feeds its
popularity counters and item pool exactly what a single joiner would: both stay
replicated, equal on every rank.
"""

from __future__ import annotations

import numpy as np
import torch

from consumers.schema import EventBatch
from streamtrain.distributed.comm import Comm

_COLUMNS = ("ts", "etype", "eid", "user", "item", "partition", "offset")


class TorchTopicExchange:
    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def buckets(self, local: np.ndarray) -> np.ndarray:
        parts = self.comm.all_gather_rows(torch.from_numpy(np.ascontiguousarray(local, np.int64)))
        return np.unique(torch.cat(parts).numpy())

    def share(self, events: EventBatch, push: np.ndarray) -> tuple[EventBatch, np.ndarray]:
        mine = np.stack([getattr(events, c).astype(np.int64) for c in _COLUMNS] + [push.astype(np.int64)], axis=1)
        everyone = torch.cat(self.comm.all_gather_rows(torch.from_numpy(mine.reshape(-1, len(_COLUMNS) + 1)))).numpy()
        col = {c: everyone[:, i] for i, c in enumerate(_COLUMNS)}
        order = np.lexsort((col["offset"], col["partition"], col["eid"], col["etype"], col["ts"]))
        n = len(order)
        merged = EventBatch(ts=col["ts"][order], etype=col["etype"][order].astype(np.int8), eid=col["eid"][order],
                            user=col["user"][order], item=col["item"][order], key=np.zeros(n, np.int64),
                            partition=col["partition"][order].astype(np.int32), offset=col["offset"][order],
                            sparse=np.zeros((n, 0), np.int64), dense=np.zeros((n, 0), np.float32),
                            raw=np.full(n, None, object))
        return merged, everyone[order, len(_COLUMNS)].astype(np.bool_)
