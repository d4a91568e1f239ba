"""The few collectives scale-out needs, over ``torch.distributed``, each counting what it moves.

:class:`Comm` is one rank's handle on the process group. Two groups when the backend is
NCCL: tensors of the model (embedding rows, gradients, outputs) go over the main group
on the training device; control data (counts, watermarks, sample and state bytes) over
a gloo group on the CPU. With gloo both are the same group. A world of one needs no
process group at all: every collective is then the identity.

Byte counts are payload bytes (what an exactly-sized exchange moves: padding that
``all_gather`` needs for unequal sizes is not counted), so they are the figure to
project to other transports; ``seconds`` is wall time inside collectives, waiting for
the slowest peer included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class OpStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    calls: int = 0


@dataclass
class CommStats:
    """Per collective (``all_to_all``: embedding ids, rows and gradients; ``all_gather``:
    outputs, samples, topic events, sketch keys; ``all_reduce``: dense gradients and the
    loop's agreements; ``broadcast``/``p2p``: checkpoint and restore), since the last
    :meth:`Comm.take_stats`."""

    ops: dict[str, OpStats] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Sent plus received, every collective."""
        return sum(o.bytes_sent + o.bytes_received for o in self.ops.values())

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.ops.values())


class Comm:
    def __init__(self, rank: int = 0, world: int = 1, *, group: dist.ProcessGroup | None = None,
                 cpu_group: dist.ProcessGroup | None = None, device: torch.device = torch.device("cpu")) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank = rank
        self.world = world
        self.device = device
        self._group = group
        self._cpu_group = cpu_group if cpu_group is not None else group
        self.stats = CommStats()

    @property
    def alone(self) -> bool:
        return self.world == 1

    def take_stats(self) -> CommStats:
        """The counters so far; resets them."""
        stats, self.stats = self.stats, CommStats()
        return stats

    @contextmanager
    def _timed(self, op: str, sent: int, received: int) -> Iterator[OpStats]:
        stats = self.stats.ops.setdefault(op, OpStats())
        started = time.perf_counter()
        yield stats
        stats.seconds += time.perf_counter() - started
        stats.bytes_sent += sent
        stats.bytes_received += received
        stats.calls += 1

    def _on(self, tensor: torch.Tensor) -> dist.ProcessGroup | None:
        return self._cpu_group if tensor.device.type == "cpu" else self._group

    # ------------------------------------------------------------------ reductions
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """In place on every rank; returns ``tensor``. Every rank ends with the same bits
        (one rank reduces each element, then it is broadcast), so replicas stay identical."""
        if self.alone:
            return tensor
        size = tensor.numel() * tensor.element_size()
        with self._timed("all_reduce", size, size):
            dist.all_reduce(tensor, op=op, group=self._on(tensor))
        return tensor

    def all_min(self, values: list[int]) -> list[int]:
        return self.all_reduce(torch.tensor(values, dtype=torch.int64), dist.ReduceOp.MIN).tolist()

    def all_max(self, values: list[int]) -> list[int]:
        return self.all_reduce(torch.tensor(values, dtype=torch.int64), dist.ReduceOp.MAX).tolist()

    # ------------------------------------------------------------------ rows
    def all_gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (sizes along dim 0 may differ; the rest must agree),
        in rank order. Timed with the size exchange it needs; bytes are the payload's."""
        if self.alone:
            return [tensor]
        row = torch.Size(tensor.shape[1:]).numel() * tensor.element_size()
        with self._timed("all_gather", 0, 0) as stats:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.int64), group=self._cpu_group)
            counts = [int(s) for s in sizes]
            padded = tensor
            if tensor.shape[0] < max(counts):  # all_gather wants equal sizes
                padded = torch.cat([tensor, tensor.new_zeros((max(counts) - tensor.shape[0], *tensor.shape[1:]))])
            out = [padded.new_empty(padded.shape) for _ in range(self.world)]
            dist.all_gather(out, padded.contiguous(), group=self._on(tensor))
            stats.bytes_sent += counts[self.rank] * row * (self.world - 1)
            stats.bytes_received += (sum(counts) - counts[self.rank]) * row
        return [t[:n] for t, n in zip(out, counts)]

    def all_to_all_rows(self, tensor: torch.Tensor, send_counts: list[int],
                        recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Send rows ``[sum(send_counts[:r]), sum(send_counts[:r+1]))`` of ``tensor`` to
        rank r; returns the rows received (in rank order) and how many came from each.
        ``recv_counts``, when the caller knows them (a reply to an earlier exchange), saves
        the collective that would learn them."""
        if len(send_counts) != self.world or sum(send_counts) != tensor.shape[0]:
            raise ValueError(f"send_counts {send_counts} do not split {tensor.shape[0]} rows over {self.world} ranks")
        if self.alone:
            return tensor, list(send_counts)
        row = torch.Size(tensor.shape[1:]).numel() * tensor.element_size()
        with self._timed("all_to_all", 0, 0) as stats:
            if recv_counts is None:
                recv = torch.empty(self.world, dtype=torch.int64)
                dist.all_to_all_single(recv, torch.tensor(send_counts, dtype=torch.int64), group=self._cpu_group)
                recv_counts = recv.tolist()
            out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
            dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=self._on(tensor))
            stats.bytes_sent += (sum(send_counts) - send_counts[self.rank]) * row
            stats.bytes_received += (sum(recv_counts) - recv_counts[self.rank]) * row
        return out, recv_counts

    # ------------------------------------------------------------------ bytes (control plane)
    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """``data`` of rank ``src`` on every rank (others pass None)."""
        if self.alone:
            assert data is not None
            return data
        size = torch.tensor([len(data) if self.rank == src and data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src, group=self._cpu_group)
        n = int(size)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src and n else torch.empty(n, dtype=torch.uint8)
        with self._timed("broadcast", n * (self.world - 1) if self.rank == src else 0, 0 if self.rank == src else n):
            if n:
                dist.broadcast(buf, src, group=self._cpu_group)
        return buf.numpy().tobytes()

    def gather_bytes(self, data: bytes, dst: int = 0) -> list[bytes] | None:
        """Every rank's ``data`` on rank ``dst`` (in rank order), None elsewhere."""
        if self.alone:
            return [data]
        if self.rank != dst:
            self._send(data, dst)
            return None
        return [data if peer == dst else self._recv(peer) for peer in range(self.world)]

    def scatter_bytes(self, parts: list[bytes] | None, src: int = 0) -> bytes:
        """Rank r gets ``parts[r]`` of rank ``src``."""
        if self.alone:
            assert parts is not None
            return parts[0]
        if self.rank == src:
            assert parts is not None and len(parts) == self.world
            for peer, part in enumerate(parts):
                if peer != src:
                    self._send(part, peer)
            return parts[src]
        return self._recv(src)

    def _send(self, data: bytes, peer: int) -> None:
        with self._timed("p2p", len(data), 0):
            dist.send(torch.tensor([len(data)], dtype=torch.int64), peer, group=self._cpu_group)
            if data:
                dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), peer, group=self._cpu_group)

    def _recv(self, peer: int) -> bytes:
        size = torch.zeros(1, dtype=torch.int64)
        with self._timed("p2p", 0, 0) as stats:
            dist.recv(size, peer, group=self._cpu_group)
            buf = torch.empty(int(size), dtype=torch.uint8)
            if int(size):
                dist.recv(buf, peer, group=self._cpu_group)
            stats.bytes_received += int(size)
        return buf.numpy().tobytes()

    def barrier(self) -> None:
        if not self.alone:
            dist.barrier(group=self._cpu_group)
