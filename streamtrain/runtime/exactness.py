"""What a restore deliberately does not replay: the paths of the daemon's checkpoint state
(``Daemon.components()``) where a crashed-and-resumed run may differ from an uninterrupted
one, each with its reason.

Everything else -- every tensor and value of the trainer (weights, Adam moments, table rows,
keys, optimizer slots, scores, admission sketch, RNG), pipeline, buffer, monitors, gate and
releases -- must be identical, bit for bit. The recovery proofs (``tests/test_daemon_recovery.py``,
``bench.chaos`` and ``tests/test_chaos.py``) check that with :func:`checkpoints.state_differences`,
passing this mapping as its ``exclude``; a path belongs here only with a reason.
"""

from __future__ import annotations

from checkpoints import LEDGER_COMPONENT

# fnmatch pattern of a dotted state path -> why it may differ after a crash and a replay.
NOT_REPLAYED: dict[str, str] = {
    "monitors.gate.last_transition.wall_time": "wall-clock stamp for alert timestamps, never used in decisions",
    LEDGER_COMPONENT: "ids trained since the parent checkpoint, whose parents differ between runs: the whole "
                      "chain is compared instead (checkpoints.ledger_chain)",
}
