"""The simulator's oracle AUC on the AUC monitor's own windows, for the demo's report.

The AUC monitor cuts the trained exposures into windows of ``monitors.auc.window`` rows;
this hook cuts the same rows the same way (exposures only, in training order, from the
run's first row: the demo starts from an empty run directory) and scores each window
with the simulator's true probabilities instead of the model's. The points go to
``<run_dir>/oracle.jsonl`` (the contract of ``streamtrain/report/curves.py``), where the
report draws them beside the model's window AUC.

Does not: touch the model's scores or the monitors; it only reads what the daemon hands
to its ``on_trained`` hook.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from consumers.schema import SampleBatch
from monitors.stats import window_auc
from streamtrain.report.curves import CurveWriter


class OracleWindows:
    """Calling the object is the daemon's ``on_trained`` hook (the training thread);
    ``truth_of(sample_ids) -> (2, n)`` gives the true pCTR and pCTCVR of exposures (NaN where
    unknown), kept by whoever receives the simulator's truth."""

    def __init__(self, window: int, writer: CurveWriter, truth_of: Callable[[np.ndarray], np.ndarray]) -> None:
        self.window = window
        self._writer = writer
        self._truth_of = truth_of
        self._true = np.zeros((2, window))  # (head, W) true probabilities of the open window
        self._labels = np.zeros((2, window), dtype=bool)  # (head, W) click, click & convert
        self._filled = 0
        self._rows = 0

    def __call__(self, batch: SampleBatch, result: object) -> None:
        fresh = ~batch["is_correction"]  # correction rows re-emit an exposure already scored
        ids = batch["sample_id"][fresh]
        true = self._truth_of(ids)  # (2, B); a row without truth scores NaN and is left out of its window's AUC
        click = batch["click"][fresh].astype(bool)
        labels = np.stack([click, click & batch["convert"][fresh].astype(bool)])  # (2, B)
        start = 0
        while start < len(ids):
            stop = min(len(ids), start + self.window - self._filled)
            rows = slice(self._filled, self._filled + stop - start)
            self._true[:, rows], self._labels[:, rows] = true[:, start:stop], labels[:, start:stop]
            self._filled += stop - start
            self._rows += stop - start
            start = stop
            if self._filled == self.window:
                self._close()

    def _close(self) -> None:
        known = np.isfinite(self._true[0])
        aucs = [float(window_auc(self._true[h, known], self._labels[h, known])) for h in (0, 1)]
        self._writer.append(self._rows, *aucs)
        self._filled = 0
