"""Ctrl-C inside a TVM callback (TVM hands it back as a bare RuntimeError) or a finalizer (Python drops it):
the flag keeps it an interrupt."""

from __future__ import annotations

import os
import signal
import time

import pytest
import tvm

from ohq_tvm.interrupts import reraise_interrupt, watch_interrupts
from ohq_tvm.oqa import LatencyDatabase, Measurer
from ohq_tvm.oqa.measure import _Run
from ohq_tvm.targets import resolve_target

from testing_support import FAST_TIMING, fp32_int8_workloads


def _interrupted_inside_tvm() -> None:
    @tvm.transform.module_pass(opt_level=0, name="InterruptedPass")
    def interrupted(mod, _ctx):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises KeyboardInterrupt here, inside TVM's call
        return mod

    tvm.transform.Sequential([interrupted])(tvm.IRModule())


def test_tvm_turns_an_interrupt_in_a_callback_into_a_runtime_error():
    with watch_interrupts(), pytest.raises(RuntimeError):
        _interrupted_inside_tvm()


def test_reraise_interrupt_restores_it_in_the_except_path():
    with watch_interrupts(), pytest.raises(KeyboardInterrupt):
        try:
            _interrupted_inside_tvm()
        except Exception:  # what a failed-build handler catches
            reraise_interrupt()
            raise
    reraise_interrupt()  # the flag does not outlive the block


def test_a_failed_build_without_an_interrupt_stays_a_failure():
    with watch_interrupts(), pytest.raises(ValueError):
        try:
            raise ValueError("not an interrupt")
        except ValueError:
            reraise_interrupt()
            raise


class _Finalizer:
    """Sends SIGINT from its ``__del__``: the handler's KeyboardInterrupt is raised there, and Python
    only prints an exception raised in a finalizer (as when TVM deletes a temporary folder)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)


def _interrupt_swallowed_by_a_finalizer() -> None:
    _Finalizer()  # deleted at once


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt
def test_an_interrupt_swallowed_by_a_finalizer_is_still_remembered():
    with watch_interrupts():
        _interrupt_swallowed_by_a_finalizer()  # returns: the KeyboardInterrupt was dropped
        with pytest.raises(KeyboardInterrupt):
            reraise_interrupt()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_measuring_stops_after_an_interrupt_a_finalizer_swallowed(tmp_path, loopback_board, monkeypatch):
    workloads = fp32_int8_workloads()
    submit = _Run.submit

    def submit_then_interrupt(self, workload, path):
        submit(self, workload, path)
        _interrupt_swallowed_by_a_finalizer()

    monkeypatch.setattr(_Run, "submit", submit_then_interrupt)
    with LatencyDatabase(tmp_path / "m.sqlite") as db, watch_interrupts():
        measurer = Measurer(loopback_board, resolve_target("host"), db, timing=FAST_TIMING)
        with pytest.raises(KeyboardInterrupt):
            measurer.run(workloads)
        # Stopped after the first operator, not after all of them.
        assert len(db.missing(measurer.fingerprint, measurer.schedule, workloads)) >= len(workloads) - 1
