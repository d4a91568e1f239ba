"""Drift monitors gate publication, proven through the real daemon (GitHub issue #7).

Each test produces one seeded simulator log to its own topic and trains it with an
in-process :class:`~streamtrain.runtime.Daemon` (real broker, joiner, trainer, monitors,
gate, publisher and webhook sink; see ``scenario_harness``). For every injected drift kind:

* nothing freezes before the drift, and the gate freezes within a bounded number of samples
  after the drift's first sample, with the monitor meant for that drift among the alarms;
* no version is published while the gate is FROZEN, although releases are due every 512
  samples and versions appear before the freeze and after the reopening (DESIGN §6.3);
* every gate transition reaches a webhook server (a real HTTP server on loopback);
* the gate reopens by itself (``unfreeze: auto``) after the drift ends.

A clean log of the same length freezes the gate 0 times and publishes on every cadence.
Monitor thresholds, warm-up, ``alarm_after`` and ``clear_after`` are the shipped defaults;
only window sizes (and the AUC baseline's EWMA weight) are scaled to the short stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from monitors.gate import GateState
from tests.scenario_harness import ScenarioRun, WebhookRecorder, produce_scenario, run_scenario, scenarios

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 3
SCENARIOS = scenarios()
DRIFTS = [name for name, scenario in SCENARIOS.items() if scenario.drift is not None]


@pytest.fixture
def webhook() -> Iterator[WebhookRecorder]:
    with WebhookRecorder() as recorder:
        yield recorder


def _train(kafka_bootstrap: str, topic: str, work_dir: Path, name: str, webhook: WebhookRecorder) -> ScenarioRun:
    scenario = SCENARIOS[name]
    produce_scenario(kafka_bootstrap, topic, scenario, SEED)
    run = run_scenario(kafka_bootstrap, topic, work_dir, scenario, SEED, webhook_url=webhook.url)
    assert run.stopped_by == "stop_after_samples", f"the stream ran dry after {run.samples_trained} samples"
    return run


def _story(run: ScenarioRun) -> str:
    """The run in one readable block, for assertion messages."""
    lines = [f"{run.scenario.name} seed {run.seed}: drift samples [{run.onset_sample}, {run.end_sample}), "
             f"{run.samples_trained} trained, gate {run.final_gate.value} at the end"]
    lines += [f"  #{t.seq} @{t.sample_count} -> {t.to_state.value} {list(t.monitors)}: {t.reason}"
              for t in run.transitions]
    lines.append(f"  versions (samples): {[s for _, s in run.versions]}")
    return "\n".join(lines)


def _windows(run: ScenarioRun, monitor: str, setting: str, extra: int) -> int:
    """``(<setting> + extra)`` windows of ``monitor``, in samples."""
    cfg = getattr(run.config.monitors, monitor)
    return (getattr(cfg, setting) + extra) * cfg.window


@pytest.mark.parametrize("name", DRIFTS)
def test_drift_freezes_the_gate_blocks_releases_alerts_and_reopens(
    name: str, kafka_bootstrap: str, unique_name: str, tmp_path: Path, webhook: WebhookRecorder
) -> None:
    run = _train(kafka_bootstrap, unique_name, tmp_path, name, webhook)
    story = _story(run)
    monitor = run.scenario.expected_monitor
    assert monitor is not None and run.onset_sample is not None and run.end_sample is not None, story

    # Frozen promptly after the drift, never before it, by the monitor meant for it.
    assert run.freezes, f"the gate never froze\n{story}"
    first = run.freezes[0]
    assert first.sample_count > run.onset_sample, f"froze before the drift started\n{story}"
    # The documented worst case (monitors/config.py) is alarm_after + 1 windows: the window
    # the drift starts in may still pass, then alarm_after bad windows. One window more for
    # labels: clicked samples leave the joiner ~1 min of event time (~500 samples here)
    # after the unclicked ones of the same moment, so a label drift reaches the trainer's
    # labels later than its first sample (python -m bench.monitors --quick measures 3031 > 3000).
    delay = run.detection_delay
    assert delay is not None and delay <= _windows(run, monitor, "alarm_after", 2), story
    assert monitor in {m for t in run.transitions for m in t.monitors}, f"{monitor} never held the gate\n{story}"

    # The gate is the only way to publish: nothing while frozen, releases on both sides.
    every = run.config.publishing.every_samples
    spans = run.frozen_spans()
    assert all(stop is not None and stop - start > 2 * every for start, stop in spans), \
        f"each freeze must outlast two release cadences for the check below to mean anything\n{story}"
    assert run.versions_published_while_frozen() == [], story
    assert any(samples < first.sample_count for _, samples in run.versions), \
        f"nothing published before the freeze\n{story}"
    last_reopen = run.reopens[-1].sample_count if run.reopens else None
    assert last_reopen is not None and any(samples >= last_reopen for _, samples in run.versions), \
        f"publishing did not resume after the gate reopened\n{story}"

    # Reopened automatically once the drift was over.
    assert run.final_gate is GateState.OPEN, story
    # clear_after good windows, after the window the drift ends in and one more: the same
    # label lag, and for a concept shift the model must relearn the restored tastes.
    assert last_reopen <= run.end_sample + _windows(run, monitor, "clear_after", 2), story
    if name != "concept_shift":
        # Data drifts stay bad while they last (bad windows never update the reference), so
        # the one freeze spans the whole drift. A concept shift may clear earlier: the AUC
        # recovers once the model has learnt the new tastes, which is the AUC monitor's job.
        assert len(run.freezes) == 1 and run.reopens[0].sample_count >= run.end_sample, story

    # Every transition reached the webhook, as the gate issued it.
    assert webhook.transitions() == [t.to_dict() for t in run.transitions], story


def test_clean_run_of_the_same_length_never_freezes(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path, webhook: WebhookRecorder
) -> None:
    run = _train(kafka_bootstrap, unique_name, tmp_path, "clean", webhook)
    story = _story(run)
    assert run.transitions == [] and run.final_gate is GateState.OPEN, story
    # The monitors were judging (not stuck warming up or short of positives) ...
    for name, status in run.monitor_status["monitors"].items():
        verdict = status["last_verdict"]
        assert not status["warming_up"] and verdict is not None and verdict["judged"] and verdict["ok"], (name, status)
    # ... and every release cadence published a version.
    assert len(run.versions) == run.samples_trained // run.config.publishing.every_samples, story
    assert webhook.payloads == []
