"""Baselines and metrics for offline model-quality runs: pure numpy, no I/O, no torch.

Every predictor here is *prequential* like the trainer: row ``t`` is scored from rows
``< t`` only, then learned from. Rows are exposures in the order the trainer sees them
(the joiner's emission order), so a baseline and the model are compared on the same rows
with the same information schedule.

* :func:`auc`, :func:`log_loss`, :func:`calibration` -- metrics of one slice of rows;
* :func:`item_rate_prior` -- an item's smoothed click rate (a Beta prior on the running
  global rate): what popularity alone predicts;
* :func:`online_mf` -- per-event logistic matrix factorisation (global, user and item
  biases + rank-k factors, Adagrad), the baseline a streaming model must beat;
  :func:`best_learning_rate` picks its rate from a grid on a slice.

Does not: load data, cut windows of a stream (the driver does), or touch the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from monitors.stats import log_loss as _log_loss
from monitors.stats import window_auc


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC; tied scores get half credit (average ranks). NaN without both classes."""
    return window_auc(np.asarray(scores), np.asarray(labels, dtype=bool))


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy in nats, probabilities clipped away from 0 and 1."""
    return _log_loss(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool))


def calibration(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean prediction / observed rate: 1 is calibrated, > 1 over-predicts. NaN without positives."""
    observed = float(np.mean(labels))
    return float(np.mean(scores)) / observed if observed > 0 else math.nan


def _previous_in_group(groups: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many earlier rows share its group, and the sum of their ``values``."""
    order = np.argsort(groups, kind="stable")  # rows of a group stay in stream order
    g, v = groups[order], values[order].astype(np.float64)
    starts = np.ones(len(g), dtype=bool)
    starts[1:] = g[1:] != g[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(g)), 0))  # (N,) index of the group's first row
    csum = np.cumsum(v) - v  # (N,) sum of all sorted rows before this one
    count, total = np.empty(len(g)), np.empty(len(g))
    count[order] = np.arange(len(g)) - first
    total[order] = csum - csum[first]
    return count, total


def item_rate_prior(items: np.ndarray, clicks: np.ndarray, strength: float = 20.0, default_rate: float = 0.05) -> np.ndarray:
    """Prequential smoothed item click rate: ``(c_i + s·m) / (n_i + s)`` from the item's
    earlier exposures ``n_i`` and clicks ``c_i``, shrunk with ``s`` pseudo-exposures to
    ``m``, the running global click rate of all earlier rows (``default_rate`` before any).
    items, clicks: (N,) in stream order -> (N,) probabilities."""
    clicks = np.asarray(clicks, dtype=np.float64)
    seen = np.arange(len(clicks), dtype=np.float64)
    global_rate = (np.cumsum(clicks) - clicks + default_rate) / (seen + 1.0)  # one pseudo-row of default_rate
    count, total = _previous_in_group(np.asarray(items), clicks)
    return (total + strength * global_rate) / (count + strength)


def online_mf(
    users: np.ndarray,
    items: np.ndarray,
    labels: np.ndarray,
    learning_rates: Sequence[float],
    *,
    rank: int = 8,
    init_std: float = 0.1,
    eps: float = 1e-8,
    seed: int = 0,
) -> np.ndarray:
    """Per-event online logistic MF, one independent model per learning rate.

    ``logit = b + b_u + b_i + <p_u, q_i>``; each row is scored, then every parameter it
    touched takes one Adagrad step on its log-loss (no regularisation). Factors start
    at N(0, init_std²) (the same draw for every rate), biases at 0.

    users, items: (N,) ids of any integer kind; labels: (N,) 0/1. Returns (G, N)
    probabilities, row g for ``learning_rates[g]``, each made before its row's update.
    The models of the grid advance together (one vectorised step over G per event), so
    a grid costs about one run; the loop over events is inherently sequential.
    """
    _, u_idx = np.unique(users, return_inverse=True)
    _, i_idx = np.unique(items, return_inverse=True)
    y = np.asarray(labels, dtype=np.float64)
    lr = np.asarray(learning_rates, dtype=np.float64)  # (G,)
    g_n = len(lr)
    rng = np.random.default_rng(seed)
    n_users, n_items = int(u_idx.max(initial=-1)) + 1, int(i_idx.max(initial=-1)) + 1
    # Event-major layout: one event reads/writes a contiguous (G, k) block per table.
    p = np.broadcast_to(rng.normal(0.0, init_std, (n_users, 1, rank)), (n_users, g_n, rank)).copy()
    q = np.broadcast_to(rng.normal(0.0, init_std, (n_items, 1, rank)), (n_items, g_n, rank)).copy()
    bias_g, bias_u, bias_i = np.zeros(g_n), np.zeros((n_users, g_n)), np.zeros((n_items, g_n))
    acc_p, acc_q = np.zeros_like(p), np.zeros_like(q)
    acc_g, acc_u, acc_i = np.zeros(g_n), np.zeros((n_users, g_n)), np.zeros((n_items, g_n))
    out = np.empty((g_n, len(y)))
    for t in range(len(y)):
        u, i = u_idx[t], i_idx[t]
        pu, qi = p[u], q[i]  # (G, k) views
        logit = bias_g + bias_u[u] + bias_i[i] + np.einsum("gk,gk->g", pu, qi)  # (G,)
        prob = 1.0 / (1.0 + np.exp(-logit))
        out[:, t] = prob
        err = prob - y[t]  # (G,) d loss / d logit
        grad_p = err[:, None] * qi  # (G, k), from the factors before the step
        grad_q = err[:, None] * pu
        sq = err * err
        acc_g += sq
        acc_u[u] += sq
        acc_i[i] += sq
        step = lr * err
        bias_g -= step / (np.sqrt(acc_g) + eps)
        bias_u[u] -= step / (np.sqrt(acc_u[u]) + eps)
        bias_i[i] -= step / (np.sqrt(acc_i[i]) + eps)
        acc_p[u] += grad_p * grad_p
        acc_q[i] += grad_q * grad_q
        pu -= lr[:, None] * grad_p / (np.sqrt(acc_p[u]) + eps)
        qi -= lr[:, None] * grad_q / (np.sqrt(acc_q[i]) + eps)
    return out


def best_learning_rate(
    predictions: np.ndarray, labels: np.ndarray, learning_rates: Sequence[float], rows: slice
) -> tuple[float, np.ndarray, list[float]]:
    """The rate of :func:`online_mf`'s grid with the highest AUC on ``rows``, its
    predictions (N,) and the AUC of every rate. Picking on the evaluated rows favours the
    baseline: a model that beats it beats every rate of the grid there."""
    scores = [auc(pred[rows], labels[rows]) for pred in predictions]
    best = int(np.nanargmax(scores))
    return float(learning_rates[best]), predictions[best], scores
