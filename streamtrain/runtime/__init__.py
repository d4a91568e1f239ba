"""The long-running process: the training loop and everything it runs beside it.

``daemon`` (the loop and its wiring), ``status`` (the snapshot it exposes),
``metric_points`` / ``metrics`` (Prometheus), ``control`` (the HTTP control endpoint),
``releases`` / ``publisher`` (model versions), ``live`` (the
terminal view). Only the CLI imports this package; it may import every other part.
"""

from streamtrain.runtime.daemon import Daemon, DaemonHooks, RunSummary

__all__ = ["Daemon", "DaemonHooks", "RunSummary"]
