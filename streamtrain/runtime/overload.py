"""Overload: deterministic negative down-sampling when the daemon cannot keep up.
No Kafka, no clocks (the backlog is measured by the caller and passed in).

When events arrive faster than the trainer can learn from them, freshness would grow
without bound. Instead the daemon trains on every positive and on a *keep-rate* share of
the unclicked exposures, each kept one weighted ``1 / rate`` in the CTR/CTCVR losses, so
the expected loss -- and with it calibration -- is that of the unsampled stream.

Replay stays exact (DESIGN §6.1) because every choice is a function of what a checkpoint
holds and of the sample sequence:

* **the keep decision** is a function of the row: a positive (clicked, converted or a
  correction) is always kept; an unclicked exposure is kept iff
  ``keep_fraction(sample_id) < rate``, a stable 64-bit mix of the id (never ``hash()``).
  An ``emit_then_correct`` correction and its first emission share the ``sample_id`` and
  are both clicked (a conversion needs a click, and the click is final at the first
  emission), so the pair is always kept together; an unclicked exposure has no correction.
* **the rate** changes only at checkpoints (:meth:`DownSampler.set_rate` is called by the
  daemon while it writes one) and is part of this component's state, so a replay from a
  checkpoint applies the rate in force when the checkpoint was cut.
* **where rows are filtered** in the sample sequence does not depend on arrival timing:
  the raw buffer (``consumers.batching.SampleBuffer``) hands out fixed ``batch_size``
  chunks; each is filtered at the rate of that moment into the *kept* buffer, which
  hands full batches to the trainer. The kept buffer and the rate of each of its rows are
  saved here, so rows filtered before a rate change keep their weight after it.

The monitors see a uniform, label-independent share of the exposures: a trained row is
*watched* iff ``keep_fraction(sample_id) < rate`` of its row, positives included. That is
what their statistics (CTR, CVR, AUC, calibration, drift) assume of a window; handing them
every kept row would inflate the click rate by ``1 / rate`` and trip the label monitor.
At rate 1 every row is watched, exactly as without down-sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from consumers.batching import SampleBuffer
from consumers.schema import SampleBatch
from streamtrain.config import OverloadConfig

FORMAT_VERSION = 1

# splitmix64 (Steele et al.) over the id xor a salt: a stable, well-mixed 64-bit hash that
# numpy vectorises. The salt keeps the keep decision independent of any other use of the
# id's bits (sharding by id, the joiner's hashes).
_SALT = np.uint64(0x6F7665726C6F6164)  # b"overload"
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def keep_fraction(sample_id: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per id, the same on every machine and in every process:
    the top 53 bits of splitmix64(id ^ salt). ``sample_id``: (B,) int64 -> (B,) float64."""
    z = sample_id.astype(np.int64).view(np.uint64) ^ _SALT
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def is_positive(batch: SampleBatch) -> np.ndarray:
    """Rows down-sampling never drops: clicked, converted, or a correction. (B,) bool."""
    return (batch["click"] > 0) | (batch["convert"] > 0) | batch["is_correction"]


def keep_mask(batch: SampleBatch, rate: float) -> np.ndarray:
    """The rows of ``batch`` kept at ``rate``: every positive, and the unclicked exposures
    whose id falls under the rate. (B,) bool."""
    return is_positive(batch) | (keep_fraction(batch["sample_id"]) < rate)


def loss_weight(batch: SampleBatch, rates: np.ndarray) -> np.ndarray:
    """Importance weight per kept row: ``1 / rate`` for the sampled negatives, 1 for the
    positives (kept with probability 1). (B,) float32."""
    return np.where(is_positive(batch), 1.0, 1.0 / rates).astype(np.float32)


def next_rate(config: OverloadConfig, rate: float, backlog: Backlog | None) -> float:
    """The rate for the steps after a checkpoint. ``fixed``: the configured rate. ``auto``:
    halve while the backlog is both long (``backlog_high_s``) and growing (arrivals outpace
    the trainer: a replay or a catch-up after an outage shrinks its backlog and is trained
    in full); double once it is short again (``backlog_low_s``); else hold (hysteresis).
    Without a measurement, hold."""
    if config.mode == "off":
        return 1.0
    if config.mode == "fixed":
        return config.keep_rate
    if backlog is None:
        return rate
    if backlog.seconds > config.backlog_high_s and backlog.growing:
        return max(config.min_keep_rate, rate * 0.5)
    if backlog.seconds < config.backlog_low_s:
        return min(1.0, rate * 2.0)
    return rate


@dataclass(frozen=True)
class Backlog:
    """How far behind the daemon is, measured by the runtime over the last window."""

    lag_events: int  # messages between the consumer's positions and the ends of its partitions
    seconds: float  # lag_events / consumption rate: time to drain at the current speed (inf if stalled)
    growing: bool  # the lag rose over the window: the input outpaces the trainer


class BacklogMeter:
    """Turns (messages consumed, lag) samples into a :class:`Backlog` over windows of
    ``window_s`` seconds of the caller's clock. ``observe`` is called once per loop turn."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._start: tuple[float, int, int] | None = None  # (time, consumed, lag) at the window's start
        self.last: Backlog | None = None  # the last complete window's measurement

    def observe(self, now: float, consumed: int, lag_events: int) -> Backlog | None:
        if self._start is None:
            self._start = (now, consumed, lag_events)
            return self.last
        t0, consumed0, lag0 = self._start
        if now - t0 < self.window_s:
            return self.last
        speed = (consumed - consumed0) / (now - t0)  # messages/s
        seconds = lag_events / speed if speed > 0 else (math.inf if lag_events else 0.0)
        self.last = Backlog(lag_events, seconds, lag_events > lag0)
        self._start = (now, consumed, lag_events)
        return self.last


@dataclass(frozen=True)
class KeptBatch:
    """A batch for the trainer and the rows of it the monitors should see."""

    batch: SampleBatch  # with a ``weight`` column (float32) when any row was down-sampled
    watched: np.ndarray | None  # (B,) bool; None: every row


class DownSampler:
    """Between the raw sample buffer and the trainer. Call order per loop turn:
    :meth:`pop_batch` until None (training each batch), :meth:`drain` at the end of a
    bounded input; :meth:`set_rate` only while a checkpoint is cut."""

    def __init__(self, batch_size: int, rate: float = 1.0) -> None:
        self.batch_size = batch_size
        self.rate = rate
        self._kept = SampleBuffer(batch_size)
        self._rates = np.zeros(0, np.float64)  # rate each kept row was filtered at, FIFO with _kept
        self.rows_offered = 0
        self.rows_dropped = 0

    def set_rate(self, rate: float) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"keep rate must be in (0, 1], got {rate}")
        self.rate = rate

    def pop_batch(self, raw: SampleBuffer) -> KeptBatch | None:
        """The next full batch of kept rows, filtering as many raw chunks as it takes."""
        if self.rate == 1.0 and not len(self._kept):
            # Nothing sampled and nothing held: hand the raw batch through unchanged, so
            # a daemon that never needed down-sampling trains exactly as with mode=off.
            chunk = raw.pop_batch()
            if chunk is not None:
                self.rows_offered += len(chunk["sample_id"])
            return None if chunk is None else KeptBatch(chunk, None)
        while len(self._kept) < self.batch_size:
            chunk = raw.pop_batch()
            if chunk is None:
                return None
            self._admit(chunk)
        return self._out(self._kept.pop_batch())

    def drain(self, raw: SampleBuffer) -> KeptBatch | None:
        """End of a bounded input: filter what the raw buffer holds, then hand out full
        batches and finally the shorter rest; None when nothing is left."""
        if (rest := raw.drain()) is not None:
            self._admit(rest)
        full = self._kept.pop_batch()
        return self._out(full if full is not None else self._kept.drain())

    def _admit(self, chunk: SampleBatch) -> None:
        keep = keep_mask(chunk, self.rate)
        n = len(keep)
        self.rows_offered += n
        self.rows_dropped += n - int(keep.sum())
        self._kept.extend(chunk if keep.all() else {k: v[keep] for k, v in chunk.items()})
        self._rates = np.concatenate([self._rates, np.full(int(keep.sum()), self.rate)])

    def _out(self, batch: SampleBatch | None) -> KeptBatch | None:
        if batch is None:
            return None
        n = len(batch["sample_id"])
        rates, self._rates = self._rates[:n], self._rates[n:]
        if (rates == 1.0).all():
            return KeptBatch(batch, None)
        return KeptBatch({**batch, "weight": loss_weight(batch, rates)}, keep_fraction(batch["sample_id"]) < rates)

    def status(self) -> dict[str, float]:
        return {"keep_rate": self.rate, "rows_offered": self.rows_offered, "rows_dropped": self.rows_dropped,
                "rows_held": len(self._kept)}

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "rate": self.rate, "kept": self._kept.state_dict(),
                "rates": self._rates.copy(), "rows_offered": self.rows_offered, "rows_dropped": self.rows_dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"overload state format {state.get('format_version')} != {FORMAT_VERSION}")
        self._kept.load_state_dict(state["kept"])
        self._rates = np.asarray(state["rates"], np.float64).copy()
        if len(self._rates) != len(self._kept):
            raise ValueError(f"overload state holds {len(self._kept)} rows but {len(self._rates)} rates")
        self.set_rate(float(state["rate"]))
        self.rows_offered = int(state["rows_offered"])
        self.rows_dropped = int(state["rows_dropped"])
