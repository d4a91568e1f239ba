"""Event simulator with a hidden ground truth (true pCTR/pCVR per exposure) and drift injection."""

from streamtrain.simulator.config import DriftSpec, SimulatorConfig
from streamtrain.simulator.runner import JsonlSink, KafkaSink, SimulationStats, run_simulation
from streamtrain.simulator.stream import EventStream, SimEvent

__all__ = ["DriftSpec", "EventStream", "JsonlSink", "KafkaSink", "SimEvent", "SimulationStats",
           "SimulatorConfig", "run_simulation"]
