"""Shared fixtures: a loopback host board for the session and a tiny compiled module."""

from __future__ import annotations

import numpy as np
import pytest

from ohq_tvm.board import LoopbackBoard

from testing_support import build_add_library


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
