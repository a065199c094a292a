"""In-model scales: the uniform plans timed whole on the board rescale each precision's measured layers."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace

import pytest

from ohq_tvm import Precision, models
from ohq_tvm.board.session import LatencyStats
from ohq_tvm.config import MeasurementConfig
from ohq_tvm.errors import BoardError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import LatencyDatabase, extract_workloads
from ohq_tvm.oqa import whole_model as whole_model_module
from ohq_tvm.oqa.cost import conversion_ms, plan_latency
from ohq_tvm.oqa.in_model import (
    SCALE_BOUNDS,
    SPREAD_BOUND,
    InModelScales,
    UniformRun,
    model_key,
    outlier_parts,
    time_uniform_plans,
    uniform_precisions,
)
from ohq_tvm.oqa.run import measure_model
from ohq_tvm.oqa.whole_model import WholeTiming
from ohq_tvm.passes import AnnotateCandidates
from ohq_tvm.plan import Plan
from ohq_tvm.targets import resolve_target

from testing_support import FAST_TIMING

HOST = resolve_target("host")
BOTH = [Precision.FP32, Precision.INT8]


def _workloads(pin_first_last=False):
    imported = load_onnx(models.tiny_cnn())
    annotated = AnnotateCandidates(BOTH, pin_first_last=pin_first_last)(imported.mod)
    return imported, extract_workloads(annotated)


def _fake_latencies(workloads):
    """Distinct made-up latencies: 1 ms per fp32 layer, 0.5 per int8 layer, 0.01 per conversion/glue (a
    conversion fused into a layer: the layer's latency + 0.01)."""
    latencies = {}
    for workload in workloads.unique():
        if workload.kind == "layer":
            latencies[workload.key] = 1.0 if workload.precision is Precision.FP32 else 0.5
        elif workload.fused_layer is None:
            latencies[workload.key] = 0.01
    for workload in workloads.unique():
        if workload.fused_layer is not None:
            latencies[workload.key] = latencies[workload.fused_layer.key] + 0.01
    return latencies


def _uniform_run(workloads, latencies, precision, measured_ms):
    plan = Plan.uniform(list(workloads.layers), precision)
    parts = plan_latency(workloads, plan.assignments, latencies)
    layers = parts.by_kind()["layer"]
    return UniformRun(precision, measured_ms, layers, parts.total_ms - layers)


def test_scaled_parts_give_each_uniform_plan_its_whole_latency_and_leave_conversions_alone():
    _, workloads = _workloads()
    latencies = _fake_latencies(workloads)
    runs = {
        Precision.FP32: _uniform_run(workloads, latencies, Precision.FP32, 9.0),
        Precision.INT8: _uniform_run(workloads, latencies, Precision.INT8, 2.0),
    }
    scales = InModelScales(runs)
    scaled = scales.apply(workloads, latencies)
    layers = list(workloads.layers)
    for precision, whole in ((Precision.FP32, 9.0), (Precision.INT8, 2.0)):
        predicted = plan_latency(workloads, Plan.uniform(layers, precision).assignments, scaled)
        assert predicted.total_ms == pytest.approx(whole)
    # int8 layers were overcharged alone (parts > whole): their factor is below 1, fp32's above.
    assert scales.scales[Precision.INT8] < 1 < scales.scales[Precision.FP32]
    for workload in workloads.unique():
        if workload.kind == "layer":
            factor = scales.scales[workload.precision]
            assert scaled[workload.key] == pytest.approx(latencies[workload.key] * factor)
        elif workload.fused_layer is None:
            assert scaled[workload.key] == latencies[workload.key]
        else:  # what a fused conversion adds to its layer stays as measured
            assert conversion_ms(workload, scaled) == pytest.approx(conversion_ms(workload, latencies))
    # A mixed plan: each layer at its own precision's factor, conversions as measured.
    mixed = {lid: Precision.INT8 if i % 2 else Precision.FP32 for i, lid in enumerate(layers)}
    raw = plan_latency(workloads, mixed, latencies)
    expected = sum(ms * (scales.scales[w.precision] if w.kind == "layer" else 1.0) for _, w, ms in raw.parts)
    assert plan_latency(workloads, mixed, scaled).total_ms == pytest.approx(expected)


def test_a_whole_model_faster_than_its_conversions_is_clamped_and_says_so():
    run = UniformRun(Precision.INT8, measured_ms=0.1, layers_ms=2.0, other_ms=0.5)
    assert run.raw_scale < 0 and run.scale == SCALE_BOUNDS[0] and run.clamped
    assert "clamped" in InModelScales({Precision.INT8: run}).describe()
    fine = UniformRun(Precision.FP32, measured_ms=2.5, layers_ms=2.0, other_ms=0.5)
    assert fine.scale == 1.0 and not fine.clamped


def test_only_precisions_every_layer_has_are_timed_uniform():
    _, free = _workloads()
    assert uniform_precisions(free) == [Precision.FP32, Precision.INT8]
    _, pinned = _workloads(pin_first_last=True)  # first and last layers stay fp32
    assert uniform_precisions(pinned) == [Precision.FP32]


def test_the_model_key_follows_the_input_shapes():
    onnx_model = models.tiny_cnn()
    for value in (*onnx_model.graph.input, *onnx_model.graph.output):  # a dynamic batch to give
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    (spec,) = load_onnx(onnx_model, {"input": (1, 3, 32, 32)}).inputs
    batch1, batch2 = (load_onnx(onnx_model, {spec.name: (n, *spec.shape[1:])}) for n in (1, 2))
    assert model_key(batch1) == model_key(load_onnx(onnx_model, {spec.name: spec.shape}))
    assert model_key(batch2) != model_key(batch1)


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_whole_model_runs_are_stored_reused_and_kept_when_the_board_fails(
    loopback_board, tmp_path, monkeypatch
):
    imported = load_onnx(models.tiny_cnn())
    db_path = tmp_path / "m.sqlite"
    messages = []
    common = dict(board=loopback_board, timing=FAST_TIMING)
    whole = MeasurementConfig(database=db_path, precisions=BOTH, whole_model=True)

    # The board fails while timing the whole models: the operators stay stored, no whole-model row is.
    real = whole_model_module.time_whole_rounds

    def dies(*args, **kwargs):
        raise BoardError("board host: the session dropped")

    monkeypatch.setattr(whole_model_module, "time_whole_rounds", dies)
    with pytest.raises(BoardError, match="session dropped"):
        measure_model(imported, HOST, measurement=whole, say=messages.append, **common)
    monkeypatch.setattr(whole_model_module, "time_whole_rounds", real)
    with LatencyDatabase(db_path) as db:
        assert db.measurements() and all(m.ok for m in db.measurements())

    measured = measure_model(imported, HOST, measurement=whole, say=messages.append, **common)
    assert measured.summary.measured == 0  # every operator came from the database
    scales = measured.in_model
    assert set(scales.runs) == set(BOTH)
    assert not any(run.reused for run in scales.runs.values())
    with LatencyDatabase(db_path) as db:
        fingerprint, schedule = measured.summary.fingerprint, measured.summary.schedule
        for precision in BOTH if not scales.unreliable else ():  # else marked: read as missing
            stored = db.model_run(fingerprint, model_key(imported), schedule, precision.value)
            assert stored is not None and stored.median_ms == scales.runs[precision].measured_ms
            assert len(stored.repeats_ms) == whole_model_module.ROUNDS * FAST_TIMING.repeat
    layers = list(measured.workloads.layers)
    for precision, run in scales.runs.items():
        parts = run.layers_ms + run.other_ms
        assert 0.2 < run.measured_ms / parts < 5  # the whole model of these parts, not something else
        if not run.clamped:
            uniform = Plan.uniform(layers, precision).assignments
            predicted = plan_latency(measured.workloads, uniform, measured.planning_latencies())
            assert predicted.total_ms == pytest.approx(run.measured_ms)
    assert any(m.startswith("uniform int8:") for m in messages)

    # A rerun builds nothing: every uniform plan comes from the database (unless this busy machine's
    # timings contradicted each other: those are timed again, as the fast tests above check).
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a uniform plan that was stored")

    if not scales.unreliable:
        monkeypatch.setattr("ohq_tvm.codegen.module.build_executable", no_build)
        again = measure_model(imported, HOST, measurement=whole, **common)
        assert all(run.reused for run in again.in_model.runs.values())
        assert again.planning_latencies() == measured.planning_latencies()
    # Without whole_model nothing is timed whole and the parts are used as measured.
    alone = measure_model(imported, HOST, measurement=replace(whole, whole_model=False), **common)
    assert alone.in_model is None and alone.planning_latencies() == alone.latencies_ms

    with LatencyDatabase(db_path) as db:
        db.clear()
        assert db.model_run(fingerprint, model_key(imported), schedule, "fp32") is None


def test_model_runs_are_kept_per_board_model_schedule_and_plan(tmp_path):
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        db.add_board("b1", "one", {})
        db.record_model_run("b1", "m", "default/r6", "int8", LatencyStats((1.0, 2.0, 3.0)))
        assert db.model_run("b1", "m", "default/r6", "int8").median_ms == 2.0
        for other in (("b2", "m", "default/r6", "int8"), ("b1", "n", "default/r6", "int8")):
            assert db.model_run(*other) is None
        assert db.model_run("b1", "m", "tuned/x/r6", "int8") is None
        assert db.model_run("b1", "m", "default/r6", "fp32") is None
        db.record_model_run("b1", "m", "default/r6", "int8", LatencyStats((5.0,)))
        assert db.model_run("b1", "m", "default/r6", "int8").repeats_ms == (5.0,)
        db.clear("b1")
        assert db.model_run("b1", "m", "default/r6", "int8") is None


def test_spread_rounds_a_slow_median_and_factors_out_of_bounds_are_named_with_their_numbers():
    fine = UniformRun(Precision.INT8, 2.0, 1.8, 0.2, spread_ms=0.2, slow_timings=2, timings=5)
    assert fine.problems() == []  # 10% spread, the median timed at the usual speed
    (clamped,) = UniformRun(Precision.FP32, 12.4, 107.0, 0.7).problems()
    assert clamped == (
        "uniform fp32: its parts add up to 108 ms, 8.7x the 12.4 ms it measures whole "
        "(in-model factor 0.11, outside 0.25-4)"
    )
    spread = UniformRun(Precision.INT8, 2.0, 1.8, 0.2, spread_ms=0.6)
    assert spread.problems() == [
        f"uniform int8: its whole-model timings spread 30% of their 2 ms median (interquartile range; "
        f"bound {SPREAD_BOUND:.0%})"
    ]
    slow = UniformRun(Precision.INT8, 2.0, 1.8, 0.2, slow_timings=3, timings=5)
    assert slow.problems() == [
        "uniform int8: 3 of its 5 whole-model timings ended with the board slower than its usual speed "
        "(the quiet gate did not wait it out)"
    ]


def test_the_outlier_parts_are_the_slowest_until_they_make_up_most_of_the_plan():
    _, workloads = _workloads()
    latencies = _fake_latencies(workloads)
    layers = list(workloads.layers)
    big = workloads.layers[layers[2]][Precision.INT8].key
    latencies[big] = 5.0
    latencies[workloads.dequantize[layers[2]].key] = 5.01
    chosen = outlier_parts(workloads, Precision.INT8, latencies)
    slowest = [w for w in chosen if w.fused_layer is None]
    fused = [w for w in chosen if w.fused_layer is not None]
    assert chosen[0].key == big and chosen == slowest + fused
    assert all(w.precision is Precision.INT8 and w.kind == "layer" for w in slowest)
    # With each layer timed again, the conversions fused into it (each a difference of the two timings).
    assert workloads.dequantize[layers[2]] in fused
    assert {w.fused_layer.key for w in fused} <= {w.key for w in slowest}
    # int8 parts: 5 + 0.5 per other layer + 0.01 per conversion and glue; 80% is covered by the big one
    # and the other layers, most of them.
    total = plan_latency(workloads, dict.fromkeys(layers, Precision.INT8), latencies).total_ms
    covered = sum(latencies[w.key] for w in slowest)
    assert covered >= 0.8 * total and covered - latencies[slowest[-1].key] < 0.8 * total


def _scripted_scales(board, workloads, latencies, db, **options):
    """:func:`time_uniform_plans` of model ``m`` on board ``b1`` (``default/r9``), timed by a
    :class:`ScriptedBoard`."""
    return time_uniform_plans(
        workloads,
        latencies,
        db,
        "b1",
        "m",
        "default/r9",
        board.time_whole,
        time_parts=board.time_parts,
        **options,
    )


class ScriptedBoard:
    """Times the uniform plans whole and the parts again with made-up numbers, storing the parts as a
    measurer would; remembers what it was asked."""

    def __init__(self, db, workloads, wholes_ms, parts_ms=None):
        self.db, self.workloads = db, workloads
        self.wholes_ms = list(wholes_ms)  # one {precision: ms} per call
        self.parts_ms = parts_ms or {}
        self.whole_calls, self.part_calls = [], []

    def time_whole(self, precisions):
        self.whole_calls.append(list(precisions))
        ms = self.wholes_ms.pop(0)
        return {p: WholeTiming(LatencyStats((ms[p],) * 5), 0, 5) for p in precisions}

    def time_parts(self, parts):
        self.part_calls.append([w.key for w in parts])
        for w in parts:
            self.db.record("b1", w, "default/r9", LatencyStats((self.parts_ms[w.precision],)))
        return {w.key: self.parts_ms[w.precision] for w in parts}


def _stored_parts(db, workloads):
    db.add_board("b1", "board", {})
    latencies = _fake_latencies(workloads)
    for workload in workloads.unique():
        db.record("b1", workload, "default/r9", LatencyStats((latencies[workload.key],)))
    return latencies


def test_parts_that_contradict_the_whole_are_timed_again_once_and_then_planned_on(tmp_path):
    _, workloads = _workloads()
    messages = []
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        latencies = _stored_parts(db, workloads)
        # int8 parts add up to ~3.6 ms, the whole runs in 0.5 (a factor of ~0.13): the int8 parts were
        # timed slow. Timed again they take 0.1 ms a layer, and the whole 0.6 ms: they agree now.
        board = ScriptedBoard(
            db,
            workloads,
            [{Precision.FP32: 7.0, Precision.INT8: 0.5}, {Precision.FP32: 7.1, Precision.INT8: 0.6}],
            {Precision.INT8: 0.1},
        )
        scales = _scripted_scales(board, workloads, latencies, db, progress=messages.append)
        assert board.whole_calls == [[Precision.FP32, Precision.INT8]] * 2  # once, then once again
        outliers = [w.key for w in outlier_parts(workloads, Precision.INT8, latencies)]
        assert board.part_calls == [outliers] and scales.retimed_parts == len(outliers)
        assert scales.retimed_ms == dict.fromkeys(outliers, 0.1)
        assert len(scales.retimed_because) == 1 and "uniform int8" in scales.retimed_because[0]
        assert scales.unreliable == () and scales.unreliable_text() is None and scales.marked_rows == 0
        assert not any(run.clamped for run in scales.runs.values())
        assert scales.runs[Precision.INT8].measured_ms == 0.6
        assert any(m.startswith("the timings disagree (uniform int8: its parts add up to") for m in messages)
        # Nothing is marked: the rows are reused by the next run.
        assert db.model_run("b1", "m", "default/r9", "int8").median_ms == 0.6
        assert len(db.latencies("b1", "default/r9")) == len(workloads.unique())


def test_timings_that_still_contradict_are_reported_and_not_reused_by_the_next_run(tmp_path):
    _, workloads = _workloads()
    unique = workloads.unique()
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        db.add_board("b1", "board", {})
        latencies = _fake_latencies(workloads)
        old, new = unique[:3], unique[3:]  # measured before this run, and in it
        for workload in old:
            db.record("b1", workload, "default/r9", LatencyStats((latencies[workload.key],)))
        started = time.time()
        for workload in new:
            db.record("b1", workload, "default/r9", LatencyStats((latencies[workload.key],)))
        # The whole int8 model stays at 0.5 ms however often the int8 parts are timed at 0.5 ms a layer.
        wholes = [{Precision.FP32: 7.0, Precision.INT8: 0.5}] * 2
        board = ScriptedBoard(db, workloads, wholes, {Precision.INT8: 0.5})
        scales = _scripted_scales(board, workloads, latencies, db, measured_since=started)
        assert len(board.whole_calls) == 2 and len(board.part_calls) == 1  # timed again once, no more
        int8 = scales.runs[Precision.INT8]
        assert int8.clamped and scales.runs[Precision.FP32].problems() == []
        assert scales.unreliable == tuple(int8.problems())
        assert f"its parts add up to {int8.parts_ms:.3g} ms" in scales.unreliable[0]
        text = scales.unreliable_text()
        assert text.startswith("the board's timings contradict each other: uniform int8: its parts add up")
        assert f"after timing {scales.retimed_parts} part(s) and the uniform plans whole again" in text
        assert scales.check_json()["unreliable"] == list(scales.unreliable)
        # What this run measured is marked (the parts, the re-timed outliers among them, both whole
        # plans); what it reused from before is not.
        retimed = set(board.part_calls[0])
        assert scales.marked_rows == len({w.key for w in new} | retimed) + 2
        missing = {w.key for w in db.missing("b1", "default/r9", unique)}
        assert missing == {w.key for w in new} | retimed
        assert not missing & ({w.key for w in old} - retimed)
        assert db.model_run("b1", "m", "default/r9", "fp32") is None
        with sqlite3.connect(tmp_path / "m.sqlite") as conn:  # each mark keeps the reason
            reasons = {r for (r,) in conn.execute("SELECT reason FROM unreliable_model_runs")}
        assert reasons == {"; ".join(scales.unreliable)}

        # The next run times both uniform plans again instead of reusing them, and a row timed again
        # is trusted again.
        again = ScriptedBoard(db, workloads, [{Precision.FP32: 7.0, Precision.INT8: 3.4}])
        rerun = _scripted_scales(again, workloads, latencies, db)
        assert again.whole_calls == [[Precision.FP32, Precision.INT8]] and again.part_calls == []
        assert rerun.unreliable == () and not any(run.reused for run in rerun.runs.values())
        assert db.model_run("b1", "m", "default/r9", "int8").median_ms == 3.4
        db.record("b1", new[0], "default/r9", LatencyStats((1.0,)))
        assert new[0].key not in {w.key for w in db.missing("b1", "default/r9", unique)}
