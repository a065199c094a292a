"""Progress of the long stages, as one object the caller implements (the CLI draws bars with it).

Every method has a do-nothing default, so a caller overrides only what it shows. Methods may be called
from worker threads (operator measurement runs one per board session).
"""

from __future__ import annotations

from collections.abc import Callable


class StageProgress:
    """Callbacks from ``compile_model`` / ``plan_model``; subclass and override what you display."""

    def say(self, message: str) -> None:
        """A stage finished or started: one line."""

    def measuring(self, total: int, to_measure: int) -> None:
        """OQA consulted the database: ``total`` unique operators, ``to_measure`` of them timed now."""

    def measured(self, event) -> None:
        """One operator finished (an :class:`~ohq_tvm.oqa.measure.MeasureEvent`)."""

    def distilling(self, done: int, total: int) -> None:
        """MQE's optimised synthetic inputs (distilled or inverted) took ``done`` of ``total`` steps."""

    def estimating(self, done: int, total: int) -> None:
        """MQE ran ``done`` of ``total`` forward passes."""

    def tuning(self, event) -> None:
        """MetaSchedule measured a batch of candidates (a :class:`~ohq_tvm.codegen.tune.TuningProgress`)."""


class _Messages(StageProgress):
    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say

    def say(self, message: str) -> None:
        self._say(message)


def as_progress(progress: StageProgress | Callable[[str], None] | None) -> StageProgress:
    """A :class:`StageProgress` from one (returned as is), a message callback, or nothing."""
    if isinstance(progress, StageProgress):
        return progress
    return _Messages(progress) if progress is not None else StageProgress()


__all__ = ["StageProgress", "as_progress"]
