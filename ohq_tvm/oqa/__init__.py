"""On-chip quantization awareness: every candidate operator timed on the board, stored, and modelled."""

from .database import LatencyDatabase, Measurement, default_database_path
from .measure import MeasureEvent, Measurer, MeasureSummary, TimingConfig, board_fingerprint
from .workloads import KINDS, ModelWorkloads, Workload, extract_workloads

__all__ = [
    "KINDS",
    "LatencyDatabase",
    "MeasureEvent",
    "MeasureSummary",
    "Measurement",
    "Measurer",
    "ModelWorkloads",
    "TimingConfig",
    "Workload",
    "board_fingerprint",
    "default_database_path",
    "extract_workloads",
]
