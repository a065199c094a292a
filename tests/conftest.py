"""Shared fixtures: a loopback host board for the session and a tiny compiled module."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ohq_tvm.board import LoopbackBoard
from ohq_tvm.oqa.measure import MIN_REPEAT_ENV, QUIET_WAIT_ENV, REPEAT_ENV

from testing_support import build_add_library

# Tests check what is measured, not how fast: no timing (here or in the commands they run) waits for a
# slow spell of the machine to pass, and timings are short (2 repeats of 5 ms; tests that need more say
# so in their own TimingConfig). The gate still re-times what it finds slowed down; test_quiet.py
# covers the waiting.
os.environ.setdefault(QUIET_WAIT_ENV, "0")
os.environ.setdefault(REPEAT_ENV, "2")
os.environ.setdefault(MIN_REPEAT_ENV, "5")


@pytest.fixture(scope="session")
def loopback_board():
    """One loopback tracker + server shared by the tests that only need a working host board."""
    with LoopbackBoard(key="host") as board:
        yield board


@pytest.fixture
def add_library(tmp_path) -> str:
    return build_add_library(tmp_path / "add.so")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
