"""Ctrl-C inside a TVM callback: TVM hands it back as a bare RuntimeError; the flag keeps it an interrupt."""

from __future__ import annotations

import os
import signal
import time

import pytest
import tvm

from ohq_tvm.interrupts import reraise_interrupt, watch_interrupts


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
