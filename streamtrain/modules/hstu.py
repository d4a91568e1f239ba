"""HSTU user encoder (Zhai et al., 2024, "Actions Speak Louder than Words", §3).

One layer::

    U, V, Q, K = split(φ1(f1(Norm(X))))                 one fused projection
    A          = SiLU(Q Kᵀ α + rab) / n  ⊙ mask          pointwise, no softmax
    Y          = X + f2(Norm(A V) ⊙ U)                   gated, residual

``rab`` is a learned bias per head over the position distance ``i - j`` and the
log-bucketed time gap ``|ts_i - ts_j|``. Sequences are right-aligned (schema.py): row
``b`` is real on positions ``[N - valid_len[b], N)`` and padding before; the mask lets
a query see only real keys at or before itself, so padding and the future never reach
a real position. ``n`` is a constant (``max_len``), not the row length, for the same
reason: adding padding must not rescale anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from streamtrain.modules.config import HSTUConfig
from streamtrain.ops.hstu_attention import Kernel, hstu_attention, resolve_kernel, softmax_attention

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


def time_gap_buckets(ts: torch.Tensor, unit_ms: int, num_buckets: int) -> torch.Tensor:
    """Pairwise log2 buckets of ``|ts_i - ts_j|``: ``floor(log2(1 + Δ / unit_ms))``,
    the last bucket absorbing everything longer. ts: (B, N) int64 ms → (B, N, N) int64."""
    return gap_buckets(ts[:, :, None] - ts[:, None, :], unit_ms, num_buckets)


def gap_buckets(delta_ms: torch.Tensor, unit_ms: int, num_buckets: int) -> torch.Tensor:
    """``floor(log2(1 + |Δ| / unit_ms))`` clamped to the last bucket, elementwise (int64 → int64)."""
    # Subtract in int64 first (the caller): epoch milliseconds do not fit fp32, their differences do (to ~1e-7).
    gap = delta_ms.abs().float() / unit_ms
    return torch.log2(1.0 + gap).floor().long().clamp_(max=num_buckets - 1)


def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0, differentiable: ``F.embedding`` is the fast gather and
    backward on CPU (``index_select``'s backward measured ~2x slower)."""
    return F.embedding(index, t.reshape(t.shape[0], -1)).view(index.shape[0], *t.shape[1:])


class RelativeAttentionBias(nn.Module):
    """rab(i, j) = w_pos[h, i - j] + w_time[h, bucket(|ts_i - ts_j|)].

    Causal attention only reads ``j <= i``, so the caller clamps negative distances to 0
    (those entries are masked anyway); ``N <= max_len`` keeps ``i - j`` inside the table.
    """

    def __init__(self, num_heads: int, max_len: int, time_buckets: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.pos = nn.Parameter(torch.zeros(num_heads, max_len))  # (H, max_len)
        self.time = nn.Parameter(torch.zeros(num_heads, time_buckets))  # (H, T)

    def forward(self, distance: torch.Tensor, time_bucket: torch.Tensor) -> torch.Tensor:
        """distance: (N, N) int64 (already clamped); time_bucket: (B, N, N) → (B, H, N, N)."""
        b, n, _ = time_bucket.shape
        h = self.pos.shape[0]
        time_bias = self.time.index_select(1, time_bucket.flatten()).view(h, b, n, n)  # (H, B, N, N)
        return (time_bias + self.pos[:, distance].unsqueeze(1)).transpose(0, 1)  # (B, H, N, N)

    def targets(self, distance: torch.Tensor, time_bucket: torch.Tensor) -> torch.Tensor:
        """The bias of one query per row: distance (M,), time_bucket (B, M) → (B, H, M)."""
        b, m = time_bucket.shape
        time_bias = self.time.index_select(1, time_bucket.flatten()).view(-1, b, m)  # (H, B, M)
        return (time_bias + self.pos[:, distance].unsqueeze(1)).transpose(0, 1)


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig, dim: int, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.num_heads
        self.splits = (h * cfg.v_dim, h * cfg.v_dim, h * cfg.qk_dim, h * cfg.qk_dim)  # U, V, Q, K
        self.norm = make_norm(cfg.norm, dim)  # of the layer input (pre-norm) or of the residual sum (post-norm)
        self.uvqk = nn.Linear(dim, sum(self.splits))
        self.act = _ACTIVATIONS[cfg.activation]()
        self.rab = RelativeAttentionBias(h, max_len, cfg.time_buckets)
        self.norm_attn = make_norm(cfg.norm, h * cfg.v_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(h * cfg.v_dim, dim)
        self.alpha = 1.0 / math.sqrt(cfg.qk_dim)
        self.inv_n = 1.0 / max_len

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) → u, v, q, k (..., H*Dv | H*Dqk): one fused projection, then φ1."""
        uvqk = self.uvqk(self.norm(x) if self.cfg.pre_norm else x)  # (..., sum(splits))
        if self.cfg.activate_qkv:
            uvqk = self.act(uvqk)
        u, v, q, k = uvqk.split(self.splits, dim=-1)
        return (u if self.cfg.activate_qkv else self.act(u)), v, q, k

    def _close(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``X + f2(Norm(A V) ⊙ U)`` (then the post-norm if configured); attn, u: (..., H*Dv)."""
        x = x + self.out(self.dropout(self.norm_attn(attn) * u))
        return x if self.cfg.pre_norm else self.norm(x)

    def forward(
        self,
        x: torch.Tensor,
        distance: torch.Tensor,
        time_bucket: torch.Tensor,
        valid_start: torch.Tensor,
        kernel: Kernel,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, N, D) → (B, N, D), and the layer's keys (B, N, H*Dqk) and values (B, N, H*Dv)
        (what a later query, :meth:`forward_targets`, attends to).
        distance (N, N), time_bucket (B, N, N), valid_start (B,)."""
        b, n, _ = x.shape
        h = self.cfg.num_heads
        u, v, q, k = self._project(x)
        bias = self.rab(distance, time_bucket)  # (B, H, N, N)
        q4, k4, v4 = q.view(b, n, h, self.cfg.qk_dim), k.view(b, n, h, self.cfg.qk_dim), v.view(b, n, h, self.cfg.v_dim)
        if self.cfg.attention == "pointwise":
            attn = hstu_attention(q4, k4, v4, bias, valid_start, alpha=self.alpha, inv_n=self.inv_n, kernel=kernel)
        else:
            attn = softmax_attention(q4, k4, v4, bias, valid_start, alpha=self.alpha)
        return self._close(x, attn.reshape(b, n, -1), u), k, v

    def forward_targets(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        distance: torch.Tensor,
        time_bucket: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """One query per row after its history: x (B, D) the targets' inputs; keys (B, M, H*Dqk)
        and values (B, M, H*Dv) the history's at this layer (gathered to the rows); distance
        (M + 1,) and time_bucket (B, M + 1) from the target to each history position and to
        itself (last); visible (B, M + 1) the real keys. Returns (B, D): the layer's output
        at the target, as :meth:`forward` computes it for the last position of
        ``cat(history, target)``, in O(M) per row instead of O(M²)."""
        b, m, _ = keys.shape
        h = self.cfg.num_heads
        u, v, q, k = self._project(x)
        keys = torch.cat([keys, k[:, None]], dim=1).view(b, m + 1, h, self.cfg.qk_dim)
        values = torch.cat([values, v[:, None]], dim=1).view(b, m + 1, h, self.cfg.v_dim)
        qh = (q.float() * self.alpha).view(b, h, self.cfg.qk_dim)
        scores = torch.einsum("bhd,bjhd->bhj", qh, keys.float())  # (B, H, M + 1)
        scores = scores + self.rab.targets(distance, time_bucket)
        mask = visible[:, None, :]  # (B, 1, M + 1)
        if self.cfg.attention == "pointwise":
            weights = torch.where(mask, F.silu(scores), 0.0) * self.inv_n
        else:
            weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), dim=-1) * mask
        attn = torch.einsum("bhj,bjhd->bhd", weights, values.float()).to(v.dtype)  # (B, H, Dv)
        return self._close(x, attn.reshape(b, -1), u)


class HSTUEncoder(nn.Module):
    """A stack of :class:`HSTULayer` over right-aligned, left-padded sequences.

    ``max_len`` bounds N: it sizes the position-distance table and is the ``n`` of the
    attention normaliser.

    Padding is skipped rather than computed and masked (the paper's jagged sequences, on
    dense tensors): rows are sorted by length, split into ``cfg.length_groups`` groups,
    and each group runs cropped to its longest row. Every op is per row and padding never
    reaches a real position, so the result is the same as one padded pass.
    """

    def __init__(self, cfg: HSTUConfig, dim: int, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_len = max_len
        self.layers = nn.ModuleList(HSTULayer(cfg, dim, max_len) for _ in range(cfg.num_layers))
        # Pre-norm leaves the residual stream unnormalised: close it like GPT's ln_f.
        self.norm_out = make_norm(cfg.norm, dim) if cfg.pre_norm else nn.Identity()

    def forward(self, x: torch.Tensor, ts: torch.Tensor, valid_len: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) input embeddings; ts: (B, N) int64 ms; valid_len: (B,) real positions
        at the right end of each row. Returns (B, N, D), exact zeros on padded positions."""
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}; truncate the history first")
        kernel = Kernel.PYTORCH if self.cfg.attention == "softmax" else resolve_kernel(self.cfg.kernel, x.device)
        order = torch.argsort(valid_len)  # (B,) shortest rows first
        groups = self._length_groups(order, valid_len, n)
        if len(groups) == 1:  # one crop fits all rows: no gather, no reorder
            m = groups[0][1]
            return F.pad(self._encode(x[:, n - m :], ts[:, n - m :], valid_len, kernel)[0], (0, 0, n - m, 0))
        outs = [
            F.pad(self._encode(x[rows, n - m :], ts[rows, n - m :], valid_len[rows], kernel)[0], (0, 0, n - m, 0))
            for rows, m in groups
        ]
        return torch.cat(outs)[torch.argsort(order)]

    def forward_with_targets(
        self,
        x: torch.Tensor,
        ts: torch.Tensor,
        valid_len: torch.Tensor,
        owner: torch.Tensor,
        target: torch.Tensor,
        target_ts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Histories encoded once, each read by any number of targets.

        x: (U, M, D) distinct histories, right-aligned; ts: (U, M); valid_len: (U,) in 0..M;
        owner: (B,) the history of each target row; target: (B, D) the targets' inputs;
        target_ts: (B,). Returns the histories' outputs (U, M, D) (as :meth:`forward`) and
        the targets' (B, D): for row ``b`` what :meth:`forward` gives at the last position
        of ``cat(x[owner[b]], target[b])``. Causality makes that exact: no history position
        reads the target, so a history shared by several rows (the exposures of one
        request) costs one pass, and each target one query against its layers' keys.
        """
        m = x.shape[1]
        if m + 1 > self.max_len:
            raise ValueError(f"sequence length {m + 1} exceeds max_len {self.max_len}; truncate the history first")
        kernel = Kernel.PYTORCH if self.cfg.attention == "softmax" else resolve_kernel(self.cfg.kernel, x.device)
        groups = self._length_groups(torch.argsort(valid_len), valid_len, m)
        if len(groups) == 1:  # one crop fits all histories: no gather, no reorder
            c = groups[0][1]
            out, kvs = self._encode(x[:, m - c :], ts[:, m - c :], valid_len, kernel)
        else:  # keys and values left-padded to the longest crop (padding is never visible)
            c = groups[-1][1]
            parts = [self._encode(x[rows, m - c_g :], ts[rows, m - c_g :], valid_len[rows], kernel) for rows, c_g in groups]
            back = torch.argsort(torch.cat([rows for rows, _ in groups]))

            def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
                return torch.cat([F.pad(t, (0, 0, c - t.shape[1], 0)) for t in tensors])[back]

            out = joined([o for o, _ in parts])
            kvs = [(joined([p[1][i][0] for p in parts]), joined([p[1][i][1] for p in parts])) for i in range(len(self.layers))]
        pos = torch.arange(c + 1, device=x.device)
        hist_ts = ts[:, m - c :].index_select(0, owner)  # (B, C)
        time_bucket = gap_buckets(torch.cat([hist_ts, target_ts[:, None]], 1) - target_ts[:, None],
                                  self.cfg.time_bucket_unit_ms, self.cfg.time_buckets)  # (B, C + 1)
        visible = pos[None, :] >= (c - valid_len).index_select(0, owner)[:, None]  # (B, C + 1); the target sees itself
        y = target
        for layer, (k, v) in zip(self.layers, kvs):
            y = layer.forward_targets(y, gather(k, owner), gather(v, owner), c - pos, time_bucket, visible)
        return F.pad(out, (0, 0, m - c, 0)), self.norm_out(y)

    def _length_groups(self, order: torch.Tensor, valid_len: torch.Tensor, n: int) -> list[tuple[torch.Tensor, int]]:
        """Split the length-sorted rows into (rows, crop length) groups; neighbours with the
        same crop are merged (all-full batches run as one group)."""
        chunks = [rows for rows in order.tensor_split(self.cfg.length_groups) if rows.numel()]
        # One host sync for all groups (a device → host copy on CUDA): crop lengths are shapes.
        crops = torch.stack([valid_len[rows[-1]] for rows in chunks]).clamp(1, n).tolist()
        groups: list[tuple[torch.Tensor, int]] = []
        for rows, m in zip(chunks, crops):
            if groups and groups[-1][1] == m:
                rows = torch.cat([groups.pop()[0], rows])
            groups.append((rows, m))
        return groups

    def _encode(self, x: torch.Tensor, ts: torch.Tensor, valid_len: torch.Tensor, kernel: Kernel
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The layer stack on one group: x (G, M, D), ts (G, M), valid_len (G,) → (G, M, D),
        and each layer's keys and values (what later targets attend to)."""
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)
        valid_start = n - valid_len  # (G,)
        distance = (pos[:, None] - pos[None, :]).clamp_(min=0)  # (M, M)
        time_bucket = time_gap_buckets(ts, self.cfg.time_bucket_unit_ms, self.cfg.time_buckets)  # (G, M, M)
        kvs = []
        for layer in self.layers:
            x, k, v = layer(x, distance, time_bucket, valid_start, kernel)
            kvs.append((k, v))
        real = (pos[None, :] >= valid_start[:, None]).unsqueeze(-1)  # (G, M, 1)
        return self.norm_out(x) * real, kvs
