"""The composed recommender: injected id embeddings → HSTU → ESMM heads + retrieval head.

One sequence per sample: the (truncated) history followed by the target item, so
position ``N-1`` is the exposure being scored. Causal attention lets the target read
the whole history while no history position reads the target. Hence one pass gives

* the **ranking** representation: HSTU output at the target (target-aware), feeding ESMM;
* the **retrieval** user vector: HSTU output at the last history event (it has not seen
  the target, so retrieval cannot cheat), with the user embedding.

The CTR logit adds the user·item dot product (field-weighted, learned) to its tower, so
the embeddings learn affinity as MF's do from the first step; the retrieval losses train
only the retrieval towers unless ``retrieval.train_shared`` (see ``modules/config.py`` for
what each measured on the demo world).

Embedding tables are injected (``item``, ``user``, ``sparse``): any ``nn.Module`` mapping
int64 ids ``(...)`` to ``(..., embedding_dim)`` with zeros for id 0. Everything else
(action, time, position and rab parameters, towers) is a dense parameter of this module;
:meth:`RecModel.dense_parameters` lists exactly those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from consumers.schema import RANK_PACKAGE_SLOTS, Action
from streamtrain.embedding.hashing import mix64
from streamtrain.modules.config import ModelConfig
from streamtrain.modules.esmm import ContextFeatures, ESMMHeads, ctcvr_log_probs, dot_interactions, esmm_loss
from streamtrain.modules.hstu import HSTUEncoder, gather
from streamtrain.modules.meanpool import MeanPoolEncoder
from streamtrain.modules.retrieval import RetrievalHead, info_nce_loss, rank_package_loss

EMBEDDING_KEYS = ("item", "user", "sparse")
_ITEM_FIELD, _USER_FIELD = 1, 2  # positions in the ESMM fields: (target-aware state, item, user, sparse...)
TARGET_ACTION = len(Action)  # the target's action is what we predict: it gets its own code
_NOW_GAP_BUCKET = 0  # the target is 0 ms old; row 0 is shared with padding, which is masked
TIME_INPUTS = ("hour", "weekday", "gap_bucket", "hist_gap_buckets", "hist_ts", "ts")
PRIOR_INPUTS = ("user_ctr_prior", "item_ctr_prior")
_NEUTRAL_PRIOR = 0.5  # logit 0: the prior adds nothing to the ESMM input


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal rows of an int64 matrix (B, W): ``(first, owner)`` with ``first`` (U,) the lowest
    row of each distinct value, in the order of the rows' hashes, and ``owner`` (B,) the index
    into ``first`` of each row, so ``x[first][owner] == x``.

    A 1-D unique of a row hash, verified: ``torch.unique(dim=0)`` costs a few ops per row on
    CPU. A hash collision (never seen) falls back to it, so the result is always exact. The
    verification is a host sync on CUDA (as is any unique: its size is data)."""
    salts = mix64(torch.arange(x.shape[1], device=x.device, dtype=torch.int64))  # (W,) one per column
    hashes, owner = torch.unique(mix64(mix64(x + salts).sum(1)), return_inverse=True)  # (U,), (B,); the sum wraps
    first = _first(owner, hashes.shape[0])
    if not torch.equal(x.index_select(0, first).index_select(0, owner), x):
        distinct, owner = torch.unique(x, dim=0, return_inverse=True)
        first = _first(owner, distinct.shape[0])
    return first, owner


def _first(owner: torch.Tensor, distinct: int) -> torch.Tensor:
    """owner (B,) in 0..distinct-1, every value present → the lowest row of each, (distinct,)."""
    rows = torch.arange(owner.shape[0], device=owner.device)
    return owner.new_full((distinct,), owner.shape[0]).scatter_reduce_(0, owner, rows, reduce="amin")


class RecModel(nn.Module):
    def __init__(self, config: ModelConfig, embeddings: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if sorted(embeddings) != sorted(EMBEDDING_KEYS):
            raise ValueError(f"embeddings must have exactly the keys {EMBEDDING_KEYS}, got {sorted(embeddings)}")
        self.config = config
        d = config.embedding_dim
        self.embeddings = nn.ModuleDict(dict(embeddings))
        self.action = nn.Embedding(TARGET_ACTION + 1, d)
        self.age = nn.Embedding(config.num_gap_buckets, d)  # how long before the exposure each event was
        self.hstu = (HSTUEncoder(config.hstu, d, max_len=config.max_history_len + 1) if config.sequence_encoder == "hstu"
                     else MeanPoolEncoder(d, config.hstu.norm))
        self.context = ContextFeatures(
            config.num_dense_features, config.num_gap_buckets, config.esmm.time_dim, config.prior_eps
        )
        n_fields = 3 + config.num_sparse_features  # target-aware state, item, user, sparse features
        shared_dim = n_fields * d + n_fields * (n_fields - 1) // 2 + self.context.out_dim
        dot_weights = self._dot_weights(n_fields) if config.esmm.ctr_dot_logit else None
        self.esmm = ESMMHeads(config.esmm, shared_dim, dot_weights)
        self.retrieval = RetrievalHead(config.retrieval, user_in=2 * d, item_in=d)
        self._compiled_encoder: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # compile_encoder()
        grades = config.retrieval.rank_grades
        self.register_buffer(  # positive first, graded above every rank-package slot
            "rank_grades", torch.tensor([max(grades) + 1, *grades]), persistent=False
        )

    @staticmethod
    def _dot_weights(n_fields: int) -> torch.Tensor:
        """Initial FwFM weights: 1 for the user·item pair, 0 for the others, in the pair order
        of ``dot_interactions`` (the upper triangle, row-major). (F(F-1)/2,)"""
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        return ((rows == _ITEM_FIELD) & (cols == _USER_FIELD)).float()

    def compile_encoder(self) -> None:
        """``torch.compile`` the sequence encoder with its target queries: the step's longest
        run of small dense ops (the embedding lookups around it are data-dependent hash-map
        work that would only break the graph). Dynamic shapes from the first call, so batches
        of another history count or crop reuse the graph instead of recompiling."""
        self._compiled_encoder = torch.compile(self.hstu.forward_with_targets, dynamic=True)

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the model itself, without the injected embedding tables."""
        return (p for name, p in self.named_parameters() if not name.startswith("embeddings."))

    def ablated(self, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``batch`` with the inputs an ablation switch turns off (``ModelConfig.time_features``,
        ``ctr_prior_features``, ``retrieval.rank_package_negatives``) replaced by constants: a
        constant carries no information, and the model's shapes stay those of the full model."""
        cfg = self.config
        off = {k: torch.zeros_like(batch[k]) for k in TIME_INPUTS if not cfg.time_features}
        off |= {k: torch.full_like(batch[k], _NEUTRAL_PRIOR) for k in PRIOR_INPUTS if not cfg.ctr_prior_features}
        if not cfg.retrieval.rank_package_negatives:
            off["rank_package"] = torch.zeros_like(batch["rank_package"])  # 0 = empty slot
        return {**batch, **off} if off else batch

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Retrieval vectors for item ids: (N,) → (N, retrieval.dim), unit norm (for export)."""
        return self.retrieval.item_vectors(self.embeddings["item"](ids))

    def _sequence(
        self, batch: Mapping[str, torch.Tensor], history_emb: torch.Tensor, target_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each row's kept history (B, L', D) followed by its target (B, D); returns the
        encoder's outputs at the last history event and at the target, (B, D) each. ``L'``
        columns are the most recent ones of each history field.

        The exposures of one request share their history (the same events, the same ages):
        each distinct history is encoded once and its rows only add their target's query
        (``forward_with_targets``), which causal attention makes exact."""
        keep = history_emb.shape[1]
        hist_len = batch["hist_len"].clamp(max=keep)
        actions = batch["hist_actions"][:, -keep:]
        ages = batch["hist_gap_buckets"][:, -keep:].clamp(max=self.config.num_gap_buckets - 1)
        ts = batch["hist_ts"][:, -keep:]
        # Everything the encoder reads of a history; equal signatures give equal outputs.
        signature = torch.cat([batch["hist_items"][:, -keep:], actions, ages, ts, hist_len[:, None]], dim=1)
        first, owner = distinct_rows(signature)  # (U,) a row holding each history, (B,) each row's history
        x = gather(history_emb, first) + self.action(actions.index_select(0, first))
        x = x + self.age(ages.index_select(0, first))  # (U, L', D)
        target = target_emb + self.action.weight[TARGET_ACTION] + self.age.weight[_NOW_GAP_BUCKET]  # (B, D)
        encode = self._compiled_encoder or self.hstu.forward_with_targets
        history, target_state = encode(
            x, ts.index_select(0, first), hist_len.index_select(0, first), owner, target, batch["ts"])
        return gather(history[:, -1], owner), target_state

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Score a sample batch (schema.py field names, tensors on this module's device).

        Returns ``ctr_logit``, ``cvr_logit``, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (B,);
        ``user_vec``, ``item_vec`` (B, dim) and ``neg_vec`` (B, P + K, dim) retrieval vectors.
        """
        batch = self.ablated(batch)
        for field, want in (("sparse", self.config.num_sparse_features), ("dense", self.config.num_dense_features)):
            if batch[field].shape[1] != want:
                raise ValueError(f"batch has {batch[field].shape[1]} {field} features, model.num_{field}_features={want}")
        hist_items = batch["hist_items"]
        # Drop leading columns that are padding in every row: outputs are unchanged (the mask
        # ignores padding) and the O(N²) attention shrinks. int() syncs with the device once.
        keep = max(1, min(hist_items.shape[1], self.config.max_history_len, int(batch["hist_len"].max())))
        b = hist_items.shape[0]
        ids = torch.cat([hist_items[:, -keep:], batch["item"][:, None], batch["rank_package"], batch["neg_items"]], 1)
        emb = self.embeddings["item"](ids)  # (B, keep + 1 + P + K, D): one lookup for all item ids
        # split, not three slices: its backward is one cat, where each slice's would zero-fill
        # a whole (B, keep + 1 + P + K, D) gradient and autograd would add the three up.
        history_emb, target_emb, neg_emb = emb.split([keep, 1, emb.shape[1] - keep - 1], dim=1)
        target_emb = target_emb.squeeze(1)  # (B, D)
        user_emb = self.embeddings["user"](batch["user"])  # (B, D)
        state, target_state = self._sequence(batch, history_emb, target_emb)  # (B, D) each

        fields = torch.cat(
            [target_state[:, None], target_emb[:, None], user_emb[:, None], self.embeddings["sparse"](batch["sparse"])], dim=1
        )  # (B, F, D): target-aware user state, target item, user, sparse features
        context = self.context(
            batch["hour"], batch["weekday"], batch["gap_bucket"], batch["dense"],
            batch["user_ctr_prior"], batch["item_ctr_prior"],
        )
        dots = dot_interactions(fields)  # (B, F(F-1)/2)
        ctr_logit, cvr_logit = self.esmm(torch.cat([fields.reshape(b, -1), dots, context], dim=-1), dots)
        log_p_ctcvr, _ = ctcvr_log_probs(ctr_logit, cvr_logit, self.config.esmm.prob_eps)
        # Retrieval reads the state at the last history event (it must not see the target).
        retrieval_in = (state, user_emb, target_emb, neg_emb)
        if not self.config.retrieval.train_shared:  # then its losses train only the retrieval towers
            retrieval_in = tuple(t.detach() for t in retrieval_in)
        state, user, item, negatives = retrieval_in
        return {
            "ctr_logit": ctr_logit,
            "cvr_logit": cvr_logit,
            "p_ctr": torch.sigmoid(ctr_logit),
            "p_cvr": torch.sigmoid(cvr_logit),
            "p_ctcvr": log_p_ctcvr.exp(),
            "user_vec": self.retrieval.user_vectors(torch.cat([state, user], dim=-1)),
            "item_vec": self.retrieval.item_vectors(item),
            "neg_vec": self.retrieval.item_vectors(negatives),
        }

    def loss(
        self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total training loss and its detached parts: ``ctr``, ``ctcvr``, ``esmm``, ``nce``,
        ``retrieval``, ``total``, and ``rank`` when a rank loss is configured.

        ``total = esmm + retrieval_weight · (nce + rank_weight · rank)``. Retrieval learns
        from clicked exposures only, and not from correction rows (their click was already
        counted when the exposure was first emitted).
        """
        cfg = self.config
        batch = self.ablated(batch)
        click = batch["click"]
        parts = esmm_loss(
            outputs["ctr_logit"], outputs["cvr_logit"], click, batch["convert"], batch["is_correction"], cfg.esmm,
            batch.get("weight"),  # present only on down-sampled batches (runtime/overload.py)
        )
        row_weight = click * ~batch["is_correction"]  # (B,)
        neg_ids = torch.cat([batch["rank_package"], batch["neg_items"]], dim=1)  # (B, P + K)
        user_vec, item_vec, neg_vec = outputs["user_vec"], outputs["item_vec"], outputs["neg_vec"]
        rcfg = cfg.retrieval
        parts["nce"] = info_nce_loss(
            user_vec, item_vec, batch["item"], neg_vec, neg_ids, row_weight, rcfg.temperature, rcfg.in_batch_negatives
        )
        retrieval = parts["nce"]
        if rcfg.rank_loss != "none":
            parts["rank"] = self._rank_loss(batch, user_vec, item_vec, neg_vec, row_weight)
            retrieval = retrieval + rcfg.rank_weight * parts["rank"]
        parts["retrieval"] = retrieval
        total = parts["esmm"] + cfg.retrieval_weight * parts["retrieval"]
        parts["total"] = total
        return total, {name: value.detach() for name, value in parts.items()}

    def _rank_loss(
        self,
        batch: Mapping[str, torch.Tensor],
        user_vec: torch.Tensor,
        item_vec: torch.Tensor,
        neg_vec: torch.Tensor,
        row_weight: torch.Tensor,
    ) -> torch.Tensor:
        """Rank the positive above the graded rank-package slots (empty slots and copies of
        the positive left out). user_vec, item_vec: (B, d); neg_vec: (B, P + K, d)."""
        package, item = batch["rank_package"], batch["item"]  # (B, P), (B,)
        pos = (user_vec * item_vec).sum(-1, keepdim=True)  # (B, 1)
        slots = torch.einsum("bd,bpd->bp", user_vec, neg_vec[:, :RANK_PACKAGE_SLOTS])  # (B, P)
        scores = torch.cat([pos, slots], dim=1) / self.config.retrieval.temperature  # (B, 1 + P)
        valid = torch.cat([torch.ones_like(pos, dtype=torch.bool), (package != 0) & (package != item[:, None])], 1)
        return rank_package_loss(scores, self.rank_grades, valid, row_weight, self.config.retrieval.rank_loss)
