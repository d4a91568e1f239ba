"""ESMM heads (Ma et al., 2018, "Entire Space Multi-Task Model") and their loss.

Both towers read one shared input (embedded fields, their pairwise dot products, and the
context: time embeddings, dense features, priors) and are trained over *all* exposures:
``pCTCVR = pCTR · pCVR``, ``loss = w_ctr · BCE(click, pCTR) + w_ctcvr · BCE(click·convert, pCTCVR)``.
pCVR is never fitted on clicked rows alone, which is what removes ESMM's sample-selection bias.

Delayed feedback (``emit_then_correct``). An exposure whose conversion arrives after its
sample was emitted is trained twice: first as a CTCVR negative (the *fake negative*, loss
``-log(1 - p)``), then through a correction sample (``is_correction``, labels 1/1). With
``correction="cancel"`` the correction row carries

    ctr term:    0                                   the click label was final the first time
    ctcvr term:  w · (-log p  -  (-log(1 - p)))      add the positive, subtract the fake negative

so fake negative + correction sum to the loss of one true positive whenever the model has
not moved in between (and to first order when it has: both terms are evaluated at the
current model). ``w = correction_weight`` is the importance weight of the pair. The
subtracted term is unbounded below as ``p → 1``; ``p`` is clamped to ``1 - prob_eps`` in
``log(1 - p)`` so the loss stays finite. Its gradient in the logits is bounded regardless:
``d/da [-log p + log(1-p)] = -(1 - σ(a)) / (1 - p)`` with ``|·| ≤ 1``.
``correction="none"`` trains a correction row like any other positive (the fake negative
then stays in the model).

All log-probabilities come from logits (``logsigmoid``, ``log1mexp``) so nothing
underflows to ``log(0)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from streamtrain.modules.config import ESMMConfig

_HOURS, _WEEKDAYS = 24, 7


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear → ReLU → Dropout per hidden width, then a linear output layer."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ContextFeatures(nn.Module):
    """Per-sample context for the shared ESMM input: hour / weekday / gap-bucket
    embeddings, dense features with missing indicators, and the CTR priors as logits."""

    def __init__(self, num_dense: int, num_gap_buckets: int, time_dim: int, prior_eps: float) -> None:
        super().__init__()
        self.hour = nn.Embedding(_HOURS, time_dim)
        self.weekday = nn.Embedding(_WEEKDAYS, time_dim)
        self.gap = nn.Embedding(num_gap_buckets, time_dim)
        self.prior_eps = prior_eps
        self.out_dim = 3 * time_dim + 2 * num_dense + 2

    def forward(
        self,
        hour: torch.Tensor,
        weekday: torch.Tensor,
        gap_bucket: torch.Tensor,
        dense: torch.Tensor,
        user_prior: torch.Tensor,
        item_prior: torch.Tensor,
    ) -> torch.Tensor:
        """hour, weekday, gap_bucket, priors: (B,); dense: (B, Dd) with NaN = missing → (B, out_dim)."""
        missing = dense.isnan()  # (B, Dd)
        # Signed log1p: raw dense features (prices, counts) have no fitted scaler in a stream.
        values = torch.where(missing, 0.0, torch.sign(dense) * torch.log1p(dense.abs()))
        priors = torch.stack([user_prior, item_prior], dim=-1).clamp(self.prior_eps, 1.0 - self.prior_eps)
        return torch.cat(
            [
                self.hour(hour.clamp(0, _HOURS - 1)),
                self.weekday(weekday.clamp(0, _WEEKDAYS - 1)),
                self.gap(gap_bucket.clamp(0, self.gap.num_embeddings - 1)),
                values,
                missing.to(values.dtype),
                torch.logit(priors),  # (B, 2)
            ],
            dim=-1,
        )


def dot_interactions(fields: torch.Tensor) -> torch.Tensor:
    """DLRM-style pairwise inner products of the embedded fields: (B, F, D) → (B, F(F-1)/2).

    MLPs learn a dot product from concatenated embeddings only slowly (Rendle et al., 2020,
    "Neural Collaborative Filtering vs. Matrix Factorization Revisited"); handing the towers
    the products directly makes user × item affinity available from the first steps, which
    matters when every sample is seen once.
    """
    f = fields.shape[1]
    rows, cols = torch.triu_indices(f, f, offset=1, device=fields.device)
    return (fields @ fields.transpose(1, 2))[:, rows, cols]


class ESMMHeads(nn.Module):
    """CTR and CVR towers over one shared input: (B, F) → two (B,) logits.

    With ``dot_weights`` (P,) the CTR logit also adds the field-weighted sum of the P
    pairwise dot products (FwFM, Pan et al., 2018; beside the tower as in DeepFM):
    ``Σ_p r_p · dots_p``, ``r`` learned from ``dot_weights``. A tower reaches a dot product
    only through its random first-layer weights, so the embeddings would learn from it
    slowly; a pair with ``r_p = 1`` is an MF logit from the first step.
    """

    def __init__(self, cfg: ESMMConfig, in_dim: int, dot_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ctr = mlp(in_dim, cfg.hidden, 1, cfg.dropout)
        self.cvr = mlp(in_dim, cfg.hidden, 1, cfg.dropout)
        self.dot_weights = None if dot_weights is None else nn.Parameter(dot_weights.detach().clone())  # (P,)

    def forward(self, shared: torch.Tensor, dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """shared: (B, F); dots: (B, P), the pairs ``dot_weights`` refers to."""
        ctr = self.ctr(shared).squeeze(-1)
        if self.dot_weights is not None:
            ctr = ctr + dots @ self.dot_weights
        return ctr, self.cvr(shared).squeeze(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Mächler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def ctcvr_log_probs(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pCTCVR, log(1 - pCTCVR))`` from the two logits, with pCTCVR ≤ 1 - eps."""
    log_p = (F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)).clamp(max=math.log1p(-eps))
    return log_p, log1mexp(log_p)


def esmm_loss(
    ctr_logit: torch.Tensor,
    cvr_logit: torch.Tensor,
    click: torch.Tensor,
    convert: torch.Tensor,
    is_correction: torch.Tensor,
    cfg: ESMMConfig,
    weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Batch-mean ESMM loss terms (all inputs (B,)): ``ctr``, ``ctcvr`` and their
    weighted sum ``esmm``. See the module docstring for the correction rows.

    ``weight`` (B,): importance weights of down-sampled rows (``streamtrain/runtime/overload.py``:
    ``1 / keep_rate`` on kept negatives); the terms are then a weighted mean, whose
    minimiser is the unsampled stream's (calibration holds). None: the plain mean."""
    ctcvr_label = click * convert
    ctr_terms = F.binary_cross_entropy_with_logits(ctr_logit, click, reduction="none")  # (B,)
    log_p, log_1mp = ctcvr_log_probs(ctr_logit, cvr_logit, cfg.prob_eps)
    ctcvr_terms = -(ctcvr_label * log_p + (1.0 - ctcvr_label) * log_1mp)  # (B,)
    if cfg.correction == "cancel":
        ctr_terms = torch.where(is_correction, 0.0, ctr_terms)
        ctcvr_terms = torch.where(is_correction, cfg.correction_weight * (log_1mp - log_p), ctcvr_terms)
    if weight is None:
        ctr, ctcvr = ctr_terms.mean(), ctcvr_terms.mean()
    else:
        total = weight.sum()
        ctr, ctcvr = (ctr_terms * weight).sum() / total, (ctcvr_terms * weight).sum() / total
    return {"ctr": ctr, "ctcvr": ctcvr, "esmm": cfg.ctr_weight * ctr + cfg.ctcvr_weight * ctcvr}
