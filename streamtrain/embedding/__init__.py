"""Dynamic embedding tables: collisionless int64 id -> row maps with admission, eviction,
row-wise optimizers, a Redis cold tier and delta dumps for serving.

This package is a leaf inside ``streamtrain``: it imports nothing from other streamtrain
packages (the nn.Module face lives in ``streamtrain.modules.dynamic_embedding``).
"""

from streamtrain.embedding.cold_tier import ColdTier, MemoryColdTier, RecordCodec
from streamtrain.embedding.config import AdmissionConfig, EmbeddingTableConfig, EvictionConfig, RowOptimizerConfig
from streamtrain.embedding.delta import EmbeddingDelta, push_to_redis, to_arrow, write_parquet
from streamtrain.embedding.hashmap import TensorHashMap
from streamtrain.embedding.redis_tier import RedisColdTier
from streamtrain.embedding.table import DEFAULT_ROW, PAD_ROW, EmbeddingTable, Lookup, TableCounters

__all__ = [
    "DEFAULT_ROW",
    "PAD_ROW",
    "AdmissionConfig",
    "ColdTier",
    "EmbeddingDelta",
    "EmbeddingTable",
    "EmbeddingTableConfig",
    "EvictionConfig",
    "Lookup",
    "MemoryColdTier",
    "RecordCodec",
    "RedisColdTier",
    "RowOptimizerConfig",
    "TableCounters",
    "TensorHashMap",
    "push_to_redis",
    "to_arrow",
    "write_parquet",
]
