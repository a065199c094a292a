"""MetaSchedule tuning on the loopback host board: records, reuse across runs and models, tuned builds."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from ohq_tvm.board import ServerBoard, TrackerBoard
from ohq_tvm.board.boards import _free_port
from ohq_tvm.codegen import (
    TUNING_DIR_ENV,
    TuningDatabase,
    build_executable,
    default_cpu_schedule,
    default_tuning_root,
    find_toolchain,
    tune_module,
    unscheduled_functions,
)
from ohq_tvm.codegen.elf import elf_machine
from ohq_tvm.codegen.tune_builder import build_candidate
from ohq_tvm.codegen.tuned_build import fuse, scheduled_module
from ohq_tvm.codegen.tuning_database import register_cpu_intrinsics, target_fingerprint, tuning_target
from ohq_tvm.errors import BoardError, BuildError, TuningError
from ohq_tvm.kernels import dot_product_isa
from ohq_tvm.oqa.workloads import Workload
from ohq_tvm.precision import Precision
from ohq_tvm.targets import resolve_target

TRIALS = 6
SHAPE = (1, 4, 8, 8)


def conv_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((8, 4, 3, 3)).astype("float32"),
        rng.standard_normal((1, 8, 1, 1)).astype("float32"),
    )


def conv_relu(with_mean: bool = False) -> tvm.IRModule:
    """relu(conv2d(x) + bias), 4 → 8 channels, optionally reduced by a mean over H and W (a second task)."""
    weight, bias = (relax.const(value) for value in conv_weights())
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, weight, padding=1) + bias))
            if with_mean:
                y = bb.emit(relax.op.mean(y, axis=[2, 3]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def conv_relu_reference(x: np.ndarray) -> np.ndarray:
    """The same in float64 numpy: 3x3 taps over the zero-padded input."""
    weight, bias = conv_weights()
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    height, width = x.shape[2:]
    out = sum(
        np.einsum("nchw,oc->nohw", padded[:, :, i : i + height, j : j + width], weight[:, :, i, j])
        for i in range(3)
        for j in range(3)
    )
    return np.maximum(out + bias, 0)


def run(executable: relax.Executable, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def candidate_folders() -> set[str]:
    """Folders the tuning builder makes in the system's temporary folder."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("ohq-tvm-candidate*")}


def worker_processes() -> set[int]:
    """This process's TVM worker children (MetaSchedule's builder and runner pools)."""
    return {
        child.pid
        for child in psutil.Process().children()
        if "popen_worker" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE
    }


@pytest.fixture(scope="module")
def host():
    return resolve_target("host")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, loopback_board, host):
    """One tuning run of ``conv_relu()`` with a small budget, and the progress events it reported."""
    root = tmp_path_factory.mktemp("tuning")
    events = []
    before = worker_processes()
    folders = candidate_folders()
    result = tune_module(conv_relu(), host, loopback_board, TRIALS, tuning_dir=root, progress=events.append)
    return result, events, root, (before, candidate_folders() - folders)


def test_tuning_measures_the_budget_and_records_it(tuned):
    result, events, root, (before, new_folders) = tuned
    assert [task.name for task in result.tasks] == ["fused_conv2d_add_relu"]
    assert result.trials_measured == TRIALS and result.trials_failed == 0
    assert result.tasks_reused == 0
    task = result.tasks[0]
    assert not task.reused and 0 < task.best_ms < 50
    # One database per target, under the root, holding every measured candidate.
    assert result.database_path.parent == root and result.database_path.name.startswith("llvm-")
    records = (result.database_path / "database_tuning_record.json").read_text().splitlines()
    # The budget's candidates plus the default schedule, timed first so a tuned build never loses to it.
    assert len(records) == TRIALS + 1 == len(result.database)
    default_record = json.loads(records[0])[1]
    assert "Sample" not in json.dumps(default_record[0])  # a fixed schedule, nothing sampled
    # The search's best few and the default schedule were re-timed side by side; the winner, one of
    # the measured schedules, is the record builds take, and its time is what the task reports.
    confirmed = (result.database_path / "confirmed" / "database_tuning_record.json").read_text().splitlines()
    assert len(confirmed) == 1
    winner = json.loads(confirmed[0])[1]
    assert winner[0] in [json.loads(line)[1][0] for line in records]  # the same trace
    assert len(winner[1]) == 3 and task.best_ms == pytest.approx(1e3 * float(np.mean(winner[1])))
    assert json.loads((result.database_path / "target.json").read_text())["num-cores"] >= 1
    # Progress: a start event, then monotonically increasing trials ending at the budget.
    assert events[0].trials_done == 0 and events[-1].trials_done == TRIALS
    done = [event.trials_done for event in events]
    assert done == sorted(done) and all(event.trials_total == TRIALS for event in events)
    assert events[-1].best_ms == pytest.approx(task.best_ms)
    # MetaSchedule's builder and runner pools are gone once tuning returns, and so is every library
    # built for the board.
    assert worker_processes() <= before
    assert not new_folders


def test_second_run_measures_nothing_and_needs_no_board(tuned, host):
    result, _events, root, _ = tuned
    # A bare RPC server on a closed port: any attempt to measure would raise BoardError.
    absent = ServerBoard("127.0.0.1", _free_port("127.0.0.1"))
    events = []
    again = tune_module(conv_relu(), host, absent, TRIALS, tuning_dir=root, progress=events.append)
    assert again.trials_measured == 0 and events == []
    assert again.tasks_reused == 1 and again.tasks[0].reused
    assert again.best_ms == result.best_ms
    assert len(again.database) == TRIALS + 1


def test_tuned_build_equals_the_untuned_build(tuned, host):
    result = tuned[0]
    x = np.random.default_rng(1).standard_normal(SHAPE).astype("float32")
    untuned = run(build_executable(conv_relu(), host), x)
    with_records = run(build_executable(conv_relu(), host, tuning=result.database), x)
    reference = conv_relu_reference(x)
    assert (reference > 0).mean() > 0.25  # relu leaves plenty of non-zero values to compare
    np.testing.assert_allclose(untuned, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(with_records, untuned, rtol=1e-5, atol=1e-5)


def _without_default_record(root, copy, host, confirm_default: bool = False) -> TuningDatabase:
    """A copy of a tuning root whose search records lack the default schedule's (the first record), and
    whose confirmed database is empty, or holds just that default record with ``confirm_default``."""
    shutil.copytree(root, copy)
    directory = next(copy.glob("llvm-*"))
    records = directory / "database_tuning_record.json"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[1:]))
    confirmed = directory / "confirmed"
    shutil.rmtree(confirmed)
    if confirm_default:
        confirmed.mkdir()
        shutil.copy(directory / "database_workload.json", confirmed / "database_workload.json")
        (confirmed / "database_tuning_record.json").write_text(lines[0])
    database = TuningDatabase.open(host, copy)
    assert len(database) == TRIALS
    return database


def test_a_build_takes_the_confirmed_record_over_the_search_best(tuned, host, tmp_path):
    # The search's best record is one of MetaSchedule's candidates; the confirmed one, the default
    # schedule, is what the build applies.
    database = _without_default_record(tuned[2], tmp_path / "tuning", host, confirm_default=True)
    model = conv_relu()
    scheduled = scheduled_module(model, database)
    with database.target:
        default = default_cpu_schedule()(fuse(model, database.target))
    name = "fused_conv2d_add_relu"
    assert tvm_ffi.structural_equal(scheduled[name], default[name])
    # Its reported time is the confirmed record's too.
    (task,) = ms.relax_integration.extract_tasks(fuse(model, database.target), database.target)
    confirmed = next((tmp_path / "tuning").glob("llvm-*")) / "confirmed" / "database_tuning_record.json"
    seconds = json.loads(confirmed.read_text())[1][1]
    assert database.best_seconds(task.dispatched[0]) == pytest.approx(float(np.mean(seconds)))


def test_records_are_reused_by_another_model_and_the_rest_gets_the_default(tuned, host, tmp_path):
    """The conv of a second model is the same workload: scheduled from the database; its new mean is
    scheduled by the default rule; nothing is left naive."""
    # Without the default schedule's record (which can be the fastest), the conv's best record is one
    # of MetaSchedule's candidates, so a conv scheduled from the database differs from the default.
    database = _without_default_record(tuned[2], tmp_path / "tuning", host)
    model = conv_relu(with_mean=True)
    scheduled = scheduled_module(model, database)
    assert unscheduled_functions(scheduled) == []
    with database.target:
        default = default_cpu_schedule()(fuse(model, database.target))
    differs = {
        gv.name_hint: not tvm_ffi.structural_equal(func, default[gv.name_hint])
        for gv, func in scheduled.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
    }
    assert differs == {"fused_conv2d_add_relu": True, "mean": False}
    x = np.random.default_rng(2).standard_normal(SHAPE).astype("float32")
    np.testing.assert_allclose(
        run(build_executable(model, host, tuning=database), x),
        run(build_executable(model, host), x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_unreachable_tracker_is_a_board_error(tuned, host):
    """The mean of the second model has no record, so tuning must measure, and the tracker is down."""
    port = _free_port("127.0.0.1")
    with pytest.raises(BoardError, match=f"127.0.0.1:{port}"):
        tune_module(
            conv_relu(with_mean=True), host, TrackerBoard("127.0.0.1", port, "host"), 4, tuning_dir=tuned[2]
        )


def test_a_bare_server_cannot_tune(tmp_path, host):
    board = ServerBoard("127.0.0.1", _free_port("127.0.0.1"))
    with pytest.raises(BoardError, match="tracker"):
        tune_module(conv_relu(), host, board, 4, tuning_dir=tmp_path)


def test_bad_tuning_dirs_and_budgets_are_clear_errors(tmp_path, host, loopback_board):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(TuningError, match=f"{not_a_dir}.*cannot be written"):
        tune_module(conv_relu(), host, loopback_board, 4, tuning_dir=not_a_dir)
    corrupt = TuningDatabase.open(host, tmp_path / "corrupt").path
    (corrupt / "database_workload.json").write_text("{ not json\n")
    with pytest.raises(TuningError, match="unreadable"):
        TuningDatabase.open(host, tmp_path / "corrupt")
    with pytest.raises(TuningError, match="at least 1"):
        tune_module(conv_relu(), host, loopback_board, 0, tuning_dir=tmp_path)


def test_database_location_and_target_key(tmp_path, monkeypatch, host):
    monkeypatch.setenv(TUNING_DIR_ENV, str(tmp_path / "env"))
    assert default_tuning_root() == tmp_path / "env"
    opened = TuningDatabase.open(host)
    assert opened.path.parent == tmp_path / "env"
    # The key is a stable hash of the full target: the same board gives the same folder, another a new one.
    assert TuningDatabase.open(resolve_target("host")).path == opened.path
    rpi = resolve_target("rpi4b")
    assert target_fingerprint(tuning_target(rpi)) != target_fingerprint(tuning_target(host))
    assert TuningDatabase.open(rpi).path.name.startswith("llvm-cortex-a72-")
    emulated = TuningDatabase.open(rpi, emulated=True).path  # emulated timings never tune a real board
    assert emulated.name == TuningDatabase.open(rpi).path.name + "-emulated"
    with pytest.raises(BuildError, match="another target"):
        build_executable(conv_relu(), rpi, tuning=opened)


def test_candidates_for_an_arm_board_are_cross_compiled_and_linked():
    """The builder's job for an aarch64 board: a design-space sample from MetaSchedule's Arm rules,
    compiled by LLVM for the board's triple and linked by the cross toolchain."""
    rpi = resolve_target("rpi4b")
    target = tuning_target(rpi)
    register_cpu_intrinsics()
    (task,) = ms.relax_integration.extract_tasks(fuse(conv_relu(), target), target)
    context = ms.TuneContext(
        mod=task.dispatched[0], target=target, space_generator="post-order-apply", rand_state=1
    )
    candidate = context.generate_design_space()[0].mod
    path = build_candidate(find_toolchain(rpi.cross_triple), candidate, target)
    try:
        assert elf_machine(path) == "aarch64"
    finally:
        shutil.rmtree(os.path.dirname(path))


@pytest.mark.skipif(
    dot_product_isa(resolve_target("host").tvm_target()) is None,
    reason="this CPU has no dot-product instruction",
)
@pytest.mark.parametrize("width", [14, 16], ids=["channel-lanes", "pixel-lanes"])
def test_tuned_int8_conv_keeps_the_dot_product_instruction(tmp_path, loopback_board, host, width):
    """MetaSchedule tunes the int8 kernel through its own rule (sampled register tiles), and the tuned
    build still multiplies with the dot-product instruction and gives the same integers. 14-wide rows
    take the kernel with lanes over output channels, 16-wide ones the one with lanes over pixels."""
    workload = Workload(
        "layer",
        "conv2d",
        Precision.INT8,
        (1, 16, width, width),
        (1, 32, width, width),
        weight_shape=(32, 16, 3, 3),
        strides=(1, 1),
        padding=(1, 1, 1, 1),
        dilation=(1, 1),
        bias=True,
        activation="relu",
    )
    mod = workload.module()
    result = tune_module(mod, host, loopback_board, TRIALS, tuning_dir=tmp_path)
    assert result.trials_measured >= TRIALS and result.trials_failed == 0
    records = (result.database_path / "database_tuning_record.json").read_text()
    assert "SampleCategorical" in records  # the kernel's tile sizes were searched
    scheduled = scheduled_module(mod, result.database)
    (kernel,) = [
        f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and "conv" in str(f)
    ]
    assert ("ohq_dot_conv2d_pixels" in kernel.script()) == (width == 16)
    kernel = kernel.with_attr("global_symbol", "main")
    asm = tvm.compile(tvm.IRModule({"main": kernel}), target=result.database.target).mod.inspect_source("asm")
    assert dot_product_isa(result.database.target).instruction in asm
    (x,) = workload.synthetic_inputs()
    untuned = run(build_executable(mod, host), x)
    np.testing.assert_array_equal(run(build_executable(mod, host, tuning=result.database), x), untuned)
