"""The hidden ground truth: latent factors, popularity and time-of-day effects.

Each exposure gets a true click probability and each click a true conversion probability.
Biases are calibrated at construction so the *mean* probabilities match ``base_ctr`` /
``base_cvr`` under the world's own exposure distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamtrain.simulator.config import SimulatorConfig

DEVICES = ("ios", "android", "web")
DEVICE_PROBS = np.array([0.45, 0.45, 0.10])
SHIFTED_DEVICE_PROBS = np.array([0.10, 0.10, 0.80])
CATEGORIES = 20
SEGMENTS = 4


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate_bias(logits: np.ndarray, target_mean: float, steps: int = 30) -> float:
    """Solve mean(sigmoid(logits + b)) == target_mean for b by Newton's method."""
    b = float(np.log(target_mean / (1 - target_mean)) - logits.mean())
    for _ in range(steps):
        p = _sigmoid(logits + b)
        grad = float((p * (1 - p)).mean())
        b -= (float(p.mean()) - target_mean) / max(grad, 1e-12)
    return b


@dataclass
class Exposure:
    user: int
    item: int
    p_ctr: float
    p_cvr: float


class World:
    def __init__(self, cfg: SimulatorConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        d = cfg.factor_dim
        self.user_factors = rng.normal(0, 1 / np.sqrt(d), (cfg.users, d))
        self.item_factors = rng.normal(0, 1 / np.sqrt(d), (cfg.items, d))
        self.item_cvr_factors = rng.normal(0, 1 / np.sqrt(d), (cfg.items, d))
        # Concept shift swaps in an alternative set of user tastes (drawn now: deterministic).
        self.shifted_user_factors = rng.normal(0, 1 / np.sqrt(d), (cfg.users, d))
        ranks = rng.permutation(cfg.items) + 1
        weights = 1.0 / ranks.astype(np.float64) ** cfg.popularity_zipf
        self.item_probs = weights / weights.sum()
        self.item_log_pop = np.log(self.item_probs * cfg.items)
        self.item_category = rng.integers(0, CATEGORIES, cfg.items)
        self.item_price = np.round(rng.lognormal(3.0, 0.8, cfg.items), 2)
        self.user_segment = np.argmax(self.user_factors[:, : min(SEGMENTS, d)], axis=1)
        self.ctr_bias, self.cvr_bias = self._calibrate(rng)

    def _calibrate(self, rng: np.random.Generator) -> tuple[float, float]:
        users, items = self._sample_exposures(rng, requests=20_000)
        n = len(users)
        # Calibrate at the zero point of the daily swing (hour 0): base_ctr is then the
        # CTR at the day's neutral time, not inflated by the swing's convexity.
        hours = np.zeros(n, dtype=np.int64)
        ctr_bias = _calibrate_bias(self.ctr_logit(users, items, hours, self.user_factors, 0.0), self.cfg.base_ctr)
        # CVR is calibrated over clicked exposures, which favour high-affinity pairs.
        p_click = _sigmoid(self.ctr_logit(users, items, hours, self.user_factors, ctr_bias))
        clicked = rng.random(n) < p_click
        cvr_bias = _calibrate_bias(self.cvr_logit(users[clicked], items[clicked], self.user_factors, 0.0), self.cfg.base_cvr)
        return ctr_bias, cvr_bias

    def _sample_exposures(self, rng: np.random.Generator, requests: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw (user, item) pairs the way the stream does: a page of distinct items per request."""
        k = self.cfg.items_per_request
        pages = rng.choice(self.cfg.items, (requests, k), p=self.item_probs)  # (R, k)
        pages.sort(axis=1)
        first = np.ones_like(pages, dtype=bool)
        first[:, 1:] = pages[:, 1:] != pages[:, :-1]  # drop repeats inside a page
        users = np.repeat(rng.integers(0, self.cfg.users, requests), k).reshape(requests, k)
        return users[first], pages[first]

    def ctr_logit(self, users: np.ndarray, items: np.ndarray, hours: np.ndarray, user_factors: np.ndarray, bias: float) -> np.ndarray:
        affinity = np.einsum("nd,nd->n", user_factors[users], self.item_factors[items]) * np.sqrt(self.cfg.factor_dim)
        hour_swing = self.cfg.hour_effect * np.sin(2 * np.pi * hours / 24.0)
        return bias + self.cfg.factor_scale * affinity + self.cfg.popularity_effect * self.item_log_pop[items] + hour_swing

    def cvr_logit(self, users: np.ndarray, items: np.ndarray, user_factors: np.ndarray, bias: float) -> np.ndarray:
        affinity = np.einsum("nd,nd->n", user_factors[users], self.item_cvr_factors[items]) * np.sqrt(self.cfg.factor_dim)
        return bias + self.cfg.factor_scale * affinity

    def probabilities(self, user: int, items: np.ndarray, hour: int, *, concept_shift: bool, ctr_odds: float) -> tuple[np.ndarray, np.ndarray]:
        """True (p_ctr, p_cvr) for one request's items."""
        factors = self.shifted_user_factors if concept_shift else self.user_factors
        users = np.full(len(items), user)
        ctr = self.ctr_logit(users, items, np.full(len(items), hour), factors, self.ctr_bias) + np.log(ctr_odds)
        cvr = self.cvr_logit(users, items, factors, self.cvr_bias)
        return _sigmoid(ctr), _sigmoid(cvr)
