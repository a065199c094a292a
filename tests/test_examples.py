"""The runnable examples under examples/ run as documented (on the generated tiny CNN)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ohq_tvm.plan import Plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_build_script_runs_the_stages_one_by_one(tmp_path):
    script = EXAMPLES / "build_script.py"
    if not script.is_file():
        pytest.skip("needs the source tree next to the tests")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), "--db", str(tmp_path / "oqa.sqlite"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    plan = Plan.load(out / "plan.json")
    assert len(plan.assignments) == 7 and plan.source == "ilp"  # every layer of the tiny CNN
    assert "int8" in plan.counts()  # size=0.5*fp32 cannot be met in fp32 alone
    assert (out / "model.so").stat().st_size > 0
    assert f"predicted {plan.predicted['latency_ms']:.3f} ms" in proc.stdout
