"""In-model scales: the uniform plans timed whole on the board rescale each precision's measured layers."""

from __future__ import annotations

import pytest

from ohq_tvm import Precision, models
from ohq_tvm.board.session import LatencyStats
from ohq_tvm.errors import BoardError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import LatencyDatabase, extract_workloads
from ohq_tvm.oqa import in_model as in_model_module
from ohq_tvm.oqa.cost import plan_latency
from ohq_tvm.oqa.in_model import SCALE_BOUNDS, InModelScales, UniformRun, model_key, uniform_precisions
from ohq_tvm.oqa.run import measure_model
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
    """Distinct made-up latencies: 1 ms per fp32 layer, 0.5 per int8 layer, 0.01 per conversion/glue."""
    latencies = {}
    for workload in workloads.unique():
        if workload.kind == "layer":
            latencies[workload.key] = 1.0 if workload.precision is Precision.FP32 else 0.5
        else:
            latencies[workload.key] = 0.01
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
        else:
            assert scaled[workload.key] == latencies[workload.key]
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
    common = dict(board=loopback_board, database=db_path, precisions=BOTH, timing=FAST_TIMING)

    # The board fails while timing the whole models: the operators stay stored, no whole-model row is.
    real = in_model_module.time_whole_models

    def dies(*args, **kwargs):
        raise BoardError("board host: the session dropped")

    monkeypatch.setattr(in_model_module, "time_whole_models", dies)
    with pytest.raises(BoardError, match="session dropped"):
        measure_model(imported, HOST, whole_model=True, say=messages.append, **common)
    monkeypatch.setattr(in_model_module, "time_whole_models", real)
    with LatencyDatabase(db_path) as db:
        assert db.measurements() and all(m.ok for m in db.measurements())

    measured = measure_model(imported, HOST, whole_model=True, say=messages.append, **common)
    assert measured.summary.measured == 0  # every operator came from the database
    scales = measured.in_model
    assert set(scales.runs) == set(BOTH)
    assert not any(run.reused for run in scales.runs.values())
    with LatencyDatabase(db_path) as db:
        fingerprint, schedule = measured.summary.fingerprint, measured.summary.schedule
        for precision in BOTH:
            stored = db.model_run(fingerprint, model_key(imported), schedule, precision.value)
            assert stored is not None and stored.median_ms == scales.runs[precision].measured_ms
            assert len(stored.repeats_ms) == in_model_module.ROUNDS * FAST_TIMING.repeat
    layers = list(measured.workloads.layers)
    for precision, run in scales.runs.items():
        parts = run.layers_ms + run.other_ms
        assert 0.2 < run.measured_ms / parts < 5  # the whole model of these parts, not something else
        if not run.clamped:
            uniform = Plan.uniform(layers, precision).assignments
            predicted = plan_latency(measured.workloads, uniform, measured.planning_latencies())
            assert predicted.total_ms == pytest.approx(run.measured_ms)
    assert any(m.startswith("uniform int8:") for m in messages)

    # A rerun builds nothing: every uniform plan comes from the database.
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a uniform plan that was stored")

    monkeypatch.setattr("ohq_tvm.build.module.build_executable", no_build)
    again = measure_model(imported, HOST, whole_model=True, **common)
    assert all(run.reused for run in again.in_model.runs.values())
    assert again.planning_latencies() == measured.planning_latencies()
    # Without whole_model nothing is timed whole and the parts are used as measured.
    alone = measure_model(imported, HOST, **common)
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
