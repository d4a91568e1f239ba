"""Top-K item retrieval over exported item vectors with FAISS.

Exact maximum inner product (``IndexFlatIP``) behind an id map, so searches return item
ids rather than row numbers. Vectors from ``RecModel.item_vectors`` are unit-norm, so
inner product is cosine. Serialisation goes through ``faiss.serialize_index`` (FAISS's own
``write_index`` format into a byte buffer), never pickle. GPU search uses faiss-gpu when
it is installed; asking for ``gpu`` without it raises.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

Device = Literal["auto", "cpu", "gpu"]


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class RetrievalIndex:
    """An immutable id → vector index; build with :meth:`build` or :meth:`from_bytes`."""

    def __init__(self, cpu_index: faiss.Index, device: Device = "auto") -> None:
        self._cpu = cpu_index  # kept for serialisation; GPU indexes cannot be written directly
        use_gpu = device == "gpu" or (device == "auto" and _gpu_available())
        if use_gpu and not _gpu_available():
            raise RuntimeError("device='gpu' needs faiss-gpu and a visible GPU")
        self._search = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index) if use_gpu else cpu_index

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, device: Device = "auto") -> RetrievalIndex:
        """ids: (N,) int64, unique and non-zero (0 means "empty" in the sample contract);
        vectors: (N, d) float."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if ids.ndim != 1 or vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"need ids (N,) and vectors (N, d); got {ids.shape} and {vectors.shape}")
        if (ids == 0).any() or len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique and non-zero")
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        index.add_with_ids(vectors, ids)
        return cls(index, device)

    @property
    def dim(self) -> int:
        return self._cpu.d

    def __len__(self) -> int:
        return self._cpu.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (Q, d) → (scores (Q, k) float32, ids (Q, k) int64), best first.
        When ``k`` exceeds the index size the missing slots hold id -1 and the lowest float32."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {queries.shape}")
        scores, ids = self._search.search(queries, k)
        return scores, ids

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._cpu).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, device: Device = "auto") -> RetrievalIndex:
        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), device)
