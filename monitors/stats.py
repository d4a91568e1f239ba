"""Pure, vectorised statistics used by the monitors (numpy in, floats/arrays out)."""

from __future__ import annotations

import math

import numpy as np

_LOG_EPS = 1e-7  # clip predictions so log-loss stays finite on a score of exactly 0 or 1


def window_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC of ``scores`` (N,) against boolean ``labels`` (N,).

    Rank-sum (Mann-Whitney) form: tied scores share their average rank, which equals the
    pairwise definition with 1/2 credit per tied positive/negative pair. NaN when the
    window has no positive or no negative. O(N log N), one sort.
    """
    labels = np.asarray(labels, dtype=bool)
    n = labels.shape[0]
    n_pos = int(np.count_nonzero(labels))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    ordered = np.asarray(scores)[order]
    starts_group = np.empty(n, dtype=bool)
    starts_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    starts = np.flatnonzero(starts_group)  # (G,) first index of each tie group
    ends = np.append(starts[1:], n)  # (G,) one past the last index
    mean_rank = (starts + ends + 1) / 2.0  # 1-based ranks start+1..end averaged
    ranks = mean_rank[np.cumsum(starts_group) - 1]  # (N,) in sorted order
    pos_rank_sum = float(ranks[labels[order]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC estimated on n_pos x n_neg pairs."""
    if n_pos == 0 or n_neg == 0 or math.isnan(auc):
        return math.nan
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy (nats); NaN on an empty window."""
    if scores.shape[0] == 0:
        return math.nan
    p = np.clip(scores, _LOG_EPS, 1.0 - _LOG_EPS)
    return float(-np.mean(np.where(labels, np.log(p), np.log1p(-p))))


def segment_psi(reference: np.ndarray, window: np.ndarray, starts: np.ndarray, epsilon: float) -> np.ndarray:
    """Population stability index per segment.

    ``reference`` and ``window`` are (K,) bucket probabilities of several histograms laid
    end to end; ``starts`` (F,) is the first bucket of each histogram. Probabilities are
    floored at ``epsilon`` so an empty bucket costs a large but finite amount. Returns (F,).
    """
    p = np.maximum(reference, epsilon)
    q = np.maximum(window, epsilon)
    return np.add.reduceat((q - p) * np.log(q / p), starts)


def segment_js(reference: np.ndarray, window: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) per segment; same layout as :func:`segment_psi`."""
    m = 0.5 * (reference + window)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(reference > 0, reference * np.log(reference / m), 0.0)
        kl_q = np.where(window > 0, window * np.log(window / m), 0.0)
    return 0.5 * np.add.reduceat(kl_p + kl_q, starts)
