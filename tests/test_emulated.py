"""Emulated ARM boards: what ohq-tvm builds for rpi4b / rk3588 executes under qemu, bit-exact with the host.

The runtime (TVM's RPC server built for aarch64) is found at ``$OHQ_TVM_ARM_RUNTIME`` or
``../shared/arm-board/aarch64`` beside the repository; qemu-user and the aarch64 libraries come from Debian
(``.ci/run`` installs them). Without them the tests that execute ARM code skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tvm
from tvm import relax

from ohq_tvm import models
from ohq_tvm.board import BoardConnection, EmulatedBoard, TrackerBoard, open_board
from ohq_tvm.board.emulated import RUNTIME_ENV, emulated_cpu, find_arm_runtime
from ohq_tvm.calibration import calibrate
from ohq_tvm.cli import main
from ohq_tvm.codegen import build_executable, find_toolchain
from ohq_tvm.codegen.module import lower_for_board
from ohq_tvm.errors import BoardError, TargetError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.kernels import NEON, SDOT, schedule_default
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.oqa import LatencyDatabase
from ohq_tvm.oqa.measure import Measurer, TimingConfig, board_fingerprint
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.targets import EMULATED_CPUS, list_boards, load_board_file, resolve_target

from kernel_cases import CONV_CASES, DENSE_CASES, PIXEL_CASES, conv_case, conv_func, dense_case
from testing_support import FAST_TIMING, OHQ_TVM, fp32_int8_workloads, gone

SHARED_RUNTIME = Path(__file__).resolve().parents[2] / "shared" / "arm-board" / "aarch64"
RK3588, RPI4B = resolve_target("rk3588"), resolve_target("rpi4b")


def _runtime_or_reason() -> tuple[str | None, str]:
    folder = os.environ.get(RUNTIME_ENV) or str(SHARED_RUNTIME)
    try:
        find_arm_runtime(folder)
    except BoardError as err:
        return None, f"no emulated ARM board here: {err}"
    return folder, ""


ARM_RUNTIME, _WHY = _runtime_or_reason()
needs_arm = pytest.mark.skipif(ARM_RUNTIME is None, reason=_WHY)
OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")


def _disassembly(library: Path) -> str:
    if OBJDUMP is None:
        pytest.skip("aarch64-linux-gnu-objdump (binutils-aarch64-linux-gnu) is not installed")
    return subprocess.run([OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True).stdout


def _mnemonics(disassembly: str, mnemonic: str) -> int:
    return sum(1 for line in disassembly.splitlines() if f"\t{mnemonic}\t" in line)


# ---------------------------------------------------------------- without the runtime


def test_every_builtin_arm_board_names_a_qemu_core_and_never_max():
    cores = {spec.name: spec.emulated_cpu for spec in list_boards() if spec.arch == "aarch64"}
    assert cores == {
        "aarch64-linux-gnu": "cortex-a53",
        "jetson-orin-nano": "neoverse-n1",
        "rk3588": "cortex-a76",
        "rpi4b": "cortex-a72",
        "rpi5": "cortex-a76",
    }
    assert all(core in EMULATED_CPUS for core in cores.values()) and "max" not in EMULATED_CPUS
    with pytest.raises(TargetError, match="only aarch64 boards"):
        emulated_cpu(resolve_target("host"))


def test_a_board_file_cannot_ask_for_qemus_max_core(tmp_path):
    board = tmp_path / "mine.toml"
    board.write_text('emulated_cpu = "max"\n[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\n')
    with pytest.raises(TargetError, match="hides code the board cannot run"):
        load_board_file(board)
    board.write_text('[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a55"\n')
    with pytest.raises(TargetError, match="add emulated_cpu"):
        emulated_cpu(load_board_file(board))  # qemu has no A55: the TOML must name the nearest core


def test_a_missing_runtime_is_one_error_naming_the_flag_the_variable_and_the_packages(monkeypatch, tmp_path):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    with pytest.raises(BoardError) as err:
        find_arm_runtime(None)
    assert all(word in str(err.value) for word in ("--arm-runtime", RUNTIME_ENV, "qemu-user", "aarch64"))
    with pytest.raises(BoardError, match="no executable tvm_rpc"):
        find_arm_runtime(tmp_path)
    (tmp_path / "tvm_rpc").write_text("#!/bin/sh\n")
    (tmp_path / "tvm_rpc").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BoardError, match="qemu-aarch64, which is not on PATH: install Debian's qemu-user"):
        find_arm_runtime(tmp_path)


def test_the_cli_says_one_line_when_the_runtime_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    model = tmp_path / "tiny.onnx"
    models.save(models.MODELS["tiny_cnn"](), model)
    status = main(["compile", str(model), "--target", "rk3588", "--emulated", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: an emulated board needs")


def test_emulated_measurements_have_their_own_fingerprint():
    real = open_board(BoardConnection(tracker="127.0.0.1:9190", key="rk3588"), RK3588)
    twin = open_board(BoardConnection(tracker="127.0.0.1:9190", key="rk3588", emulated=True), RK3588)
    device = {"threads": "4"}
    (real_id, real_description), (twin_id, twin_description) = (
        board_fingerprint(RK3588, board, device) for board in (real, twin)
    )
    assert real_id != twin_id
    assert "emulated" not in real_description
    assert twin_description["emulated"] == "qemu-aarch64 -cpu cortex-a76"


# ---------------------------------------------------------------- on the emulated boards


@pytest.fixture(scope="module")
def rk3588_board():
    if ARM_RUNTIME is None:
        pytest.skip(_WHY)
    with EmulatedBoard(RK3588, ARM_RUNTIME) as board:
        yield board


def _tiny_model(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    models.save(models.MODELS["tiny_cnn"](), path)
    return path


@needs_arm
@pytest.mark.parametrize(
    ("board", "cpu", "sdot"), [("rk3588", "cortex-a76", True), ("rpi4b", "cortex-a72", False)]
)
def test_int8_compile_on_an_emulated_board_is_verified(board, cpu, sdot, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", str(_tiny_model(tmp_path)), "--target", board, "--emulated", "--precision", "int8"]
    assert main([*args, "--arm-runtime", ARM_RUNTIME, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ok: ran on {board} (emulated {cpu})" in printed and "latencies are not the board's" in printed
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    assert verification["passed"] and verification["board"] == f"{board} (emulated {cpu})"
    assert verification["emulated"]["by"] == f"qemu-aarch64 -cpu {cpu}"
    sdots = _mnemonics(_disassembly(out / "model.so"), "sdot")
    assert sdots > 50 if sdot else sdots == 0


@needs_arm
def test_int8_model_on_emulated_arm_boards_equals_the_host_bit_for_bit(
    rk3588_board, loopback_board, tmp_path
):
    imported = load_onnx(models.MODELS["tiny_cnn"]())
    calibration = calibrate(imported, "minmax", num_samples=2)
    mod = ApplyPlan(Plan.uniform(quantizable_layers(imported.mod), "int8"), calibration)(imported.mod)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    outputs = {}
    with EmulatedBoard(RPI4B, ARM_RUNTIME) as rpi4b_board:
        for spec, board in (
            (resolve_target("host"), loopback_board),
            (RK3588, rk3588_board),
            (RPI4B, rpi4b_board),
        ):
            library = tmp_path / f"{spec.name}.so"
            fcompile = find_toolchain(spec.cross_triple).fcompile()
            build_executable(mod, spec, "default", None).export_library(str(library), fcompile=fcompile)
            outputs[spec.name] = board.connect().load_vm(library).run([x])[0]
    assert np.abs(outputs["host"]).max() > 0.1
    np.testing.assert_array_equal(outputs["rk3588"], outputs["host"])  # sdot kernels vs VNNI (or reference)
    np.testing.assert_array_equal(outputs["rpi4b"], outputs["host"])  # ARMv8.0: no dot product


def _kernel_library(path: Path, isa=SDOT, spec=RK3588) -> list[tuple[str, list[np.ndarray], np.ndarray]]:
    """Every ``isa`` conv (rows and pixel forms) and dense case in one library for ``spec``; the cases."""
    funcs, cases = {}, []
    for index, case in enumerate(CONV_CASES + PIXEL_CASES):
        pixels = index >= len(CONV_CASES)
        data, packed, bias, expected = conv_case(isa, *case, pixels=pixels)
        funcs[f"conv{index}"] = conv_func(isa, *case, pixels=pixels)
        cases.append((f"conv{index}", [data, packed, bias], expected))
    for index, (shape, columns) in enumerate(DENSE_CASES):
        func, arrays, expected = dense_case(isa, shape, columns)
        funcs[f"dense{index}"] = func
        cases.append((f"dense{index}", arrays, expected))
    scheduled = {
        name: schedule_default(func).mod["main"].with_attr("global_symbol", name)
        for name, func in funcs.items()
    }
    library = tvm.compile(tvm.IRModule(scheduled), target=spec.tvm_target())
    library.export_library(str(path), fcompile=find_toolchain(spec.cross_triple).fcompile())
    return cases


def _run_kernel_cases(board, path: Path, cases) -> None:
    session = board.connect()
    library = session.load_library(path)
    for name, arrays, expected in cases:
        out = tvm.runtime.empty(expected.shape, "int32", session.device)
        library[name](*[tvm.runtime.tensor(a, session.device) for a in arrays], out)
        np.testing.assert_array_equal(out.numpy(), expected, err_msg=name)


@needs_arm
def test_neon_kernels_are_bit_exact_on_an_emulated_cortex_a72(tmp_path):
    # ARMv8.0 (a Raspberry Pi 4's Cortex-A72): no sdot; smull + sadalp on int8 pairs instead.
    cases = _kernel_library(tmp_path / "kernels.so", NEON, RPI4B)
    disassembly = _disassembly(tmp_path / "kernels.so")
    assert _mnemonics(disassembly, "sadalp") >= 9 * len(cases) // 2 and _mnemonics(disassembly, "sdot") == 0
    with EmulatedBoard(RPI4B, ARM_RUNTIME) as rpi4b_board:
        _run_kernel_cases(rpi4b_board, tmp_path / "kernels.so", cases)


@needs_arm
def test_sdot_kernels_are_bit_exact_on_an_emulated_cortex_a76(rk3588_board, tmp_path):
    cases = _kernel_library(tmp_path / "kernels.so")
    assert _mnemonics(_disassembly(tmp_path / "kernels.so"), "sdot") >= 9 * len(cases)
    _run_kernel_cases(rk3588_board, tmp_path / "kernels.so", cases)


@needs_arm
def test_fp32_channel_form_runs_on_an_emulated_cortex_a76(rk3588_board, tmp_path):
    # A float 1x1 conv on a 7x7 map (49 pixels, no 4-lane vectors) takes the fp32 channel form (fmla).
    rng = np.random.default_rng(3)
    x = relax.Var("x", relax.TensorType((1, 32, 7, 7), "float32"))
    weight = rng.standard_normal((40, 32, 1, 1)).astype("float32")
    bias = rng.standard_normal((1, 40, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, relax.const(weight)))
            out = bb.emit_output(relax.op.nn.relu(bb.emit(relax.op.add(conv, relax.const(bias)))))
        bb.emit_func_output(out)
    lowered = lower_for_board(bb.get(), RK3588)
    assert any("conv2d_fp32_fma_neon" in gv.name_hint for gv in lowered.get_global_vars())
    library = tmp_path / "fp32.so"
    executable = build_executable(bb.get(), RK3588, "default", None)
    executable.export_library(str(library), fcompile=find_toolchain(RK3588.cross_triple).fcompile())
    assert _mnemonics(_disassembly(library), "fmla") > 0
    data = rng.standard_normal((1, 32, 7, 7)).astype("float32")
    result = rk3588_board.connect().load_vm(library).run([data])[0]
    expected = np.maximum(np.einsum("nchw,oc->nohw", data, weight[:, :, 0, 0]) + bias, 0)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)


@needs_arm
def test_an_fp16_plan_runs_on_an_emulated_rk3588_within_its_bound(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", str(_tiny_model(tmp_path)), "--target", "rk3588", "--emulated", "--precision", "fp16"]
    assert main([*args, "--arm-runtime", ARM_RUNTIME, "-o", str(out)]) == 0
    verification = json.loads((out / "manifest.json").read_text())["verification"]
    (output,) = verification["outputs"]
    assert verification["passed"] and 0 < output["relative_error"] <= verification["tolerance"]
    half = [
        line.split("\t")[2]
        for line in _disassembly(out / "model.so").splitlines()
        if line.count("\t") >= 3 and (".4h" in line or ".8h" in line)
    ]
    arithmetic = [name for name in half if name in ("fmla", "fmul", "fadd")]
    assert len(arithmetic) > 50  # fp16 vector arithmetic, not only conversions, really ran


@needs_arm
def test_an_rk3588_module_on_an_emulated_cortex_a72_fails_with_an_illegal_instruction(tmp_path):
    _kernel_library(tmp_path / "kernels.so")
    data, packed, bias, expected = conv_case(SDOT, *CONV_CASES[0])
    started = time.monotonic()
    with EmulatedBoard(RK3588, ARM_RUNTIME, cpu="cortex-a72") as older:
        session = older.connect()
        library = session.load_library(tmp_path / "kernels.so")
        out = tvm.runtime.empty(expected.shape, "int32", session.device)
        arrays = [tvm.runtime.tensor(a, session.device) for a in (data, packed, bias)]
        with pytest.raises(BoardError) as err:
            session._guard("running conv0", lambda: library["conv0"](*arrays, out))
    assert "signal 4 (Illegal instruction)" in str(err.value) and "cortex-a72 lacks" in str(err.value)
    assert time.monotonic() - started < 60


@pytest.mark.slow  # 33 s on a 2-core host
@needs_arm
def test_a_stopped_server_is_an_error_within_the_timeout(rk3588_board):
    (server,) = rk3588_board.server_processes
    host, port, key = rk3588_board.rpc_tracker()
    board = TrackerBoard(host, port, key, wait_for_server_s=3, answer_timeout_s=3)
    os.killpg(server.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        started = time.monotonic()
        with pytest.raises(BoardError, match="no answer within 3 s"):
            board.connect(session_timeout_s=30)
        assert time.monotonic() - started < 10
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    rk3588_board.connect()  # and it serves again


@needs_arm
@pytest.mark.slow
def test_compile_budget_runs_end_to_end_on_an_emulated_board(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["compile", str(_tiny_model(tmp_path)), "--target", "rk3588", "--emulated", "--arm-runtime"]
    args += [ARM_RUNTIME, "--budget", "size=0.5*fp32", "--precisions", "fp32,int8"]
    assert main([*args, "--db", str(tmp_path / "m.sqlite"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "is emulated (qemu-aarch64 -cpu cortex-a76)" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["verification"]["emulated"]
    assert manifest["planning"]["operators_measured"] > 0
    assert "latencies are not the board's" in (out / "report.md").read_text()
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        (board,) = db.boards()
    assert board["description"]["emulated"] == "qemu-aarch64 -cpu cortex-a76"


@needs_arm
@pytest.mark.slow
def test_a_fleet_of_host_and_emulated_boards_measures_under_the_right_fingerprints(loopback_board, tmp_path):
    workloads = fp32_int8_workloads()
    tracker = loopback_board.tracker_address
    summaries = {}
    with (
        EmulatedBoard(RK3588, ARM_RUNTIME, tracker=tracker, num_servers=2),
        EmulatedBoard(RPI4B, ARM_RUNTIME, tracker=tracker),
        LatencyDatabase(tmp_path / "m.sqlite") as db,
    ):
        for spec in (RK3588, RPI4B):
            board = open_board(BoardConnection(tracker=tracker, emulated=True), spec)
            summaries[spec.name] = Measurer(board, spec, db, timing=FAST_TIMING).run(workloads)
        host = Measurer(loopback_board, resolve_target("host"), db, timing=FAST_TIMING)
        host_fingerprint = host.fingerprint
        boards = {row["fingerprint"]: row["description"] for row in db.boards()}
        rows = {name: db.latencies(s.fingerprint, s.schedule) for name, s in summaries.items()}
    assert summaries["rk3588"].fingerprint != summaries["rpi4b"].fingerprint != host_fingerprint
    for name, cpu in (("rk3588", "cortex-a76"), ("rpi4b", "cortex-a72")):
        description = boards[summaries[name].fingerprint]
        assert (
            description["key"] == f"{name}-emulated" and description["emulated"] == f"qemu-aarch64 -cpu {cpu}"
        )
        assert len(rows[name]) == len(workloads) and summaries[name].failed == {}
    assert "emulated" not in boards[host_fingerprint]
    assert len(summaries["rk3588"].workers) == 2  # two servers under one key measured in parallel


@needs_arm
@pytest.mark.slow
def test_killing_an_emulated_server_mid_measurement_loses_nothing(tmp_path):
    workloads = fp32_int8_workloads()
    slow = TimingConfig(repeat=2, min_repeat_ms=1500, warmup=0, max_attempts=3)
    events, killed = [], []
    with (
        EmulatedBoard(RK3588, ARM_RUNTIME, num_servers=2) as board,
        LatencyDatabase(tmp_path / "m.sqlite") as db,
    ):

        def kill(event) -> None:
            events.append((time.monotonic(), event))
            if event.status == "ok" and not killed:  # while the other worker times on its server
                os.killpg(board.server_processes[0].pid, signal.SIGKILL)
                killed.append(time.monotonic())

        measurer = Measurer(board, RK3588, db, timing=slow)
        try:
            first = measurer.run(workloads, kill)
        except BoardError as err:  # stopping cleanly is allowed too: what was measured stays
            assert "rerun to measure the rest" in str(err)
            first = None
        kept = db.latencies(measurer.fingerprint, measurer.schedule)
        rerun = Measurer(board, RK3588, db, timing=FAST_TIMING).run(workloads)
        after = db.latencies(measurer.fingerprint, measurer.schedule)
    assert killed and any(at > killed[0] for at, _ in events)  # the run went on after the kill
    assert kept and all(value > 0 for value in kept.values())
    assert rerun.reused == len(kept) and rerun.measured == len(workloads) - len(kept)  # only what was missing
    assert after.items() >= kept.items() and len(after) == len(workloads)  # 0 rows lost
    assert first is None or first.failed == {}


@needs_arm
def test_board_emulate_serves_until_interrupted_and_leaves_nothing_running(tmp_path):
    env = {**os.environ, RUNTIME_ENV: ARM_RUNTIME}
    proc = subprocess.Popen(
        [str(OHQ_TVM), "board", "emulate", "rpi4b", "--servers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    children: list[int] = []
    try:
        first = proc.stdout.readline()
        assert "`qemu-aarch64 -cpu cortex-a72`" in first and "key 'rpi4b-emulated'" in first
        address = first.split("RPC tracker ")[1].split()[0]
        usage = proc.stdout.readline()
        assert f"--tracker {address} --emulated" in usage
        board = open_board(BoardConnection(tracker=address, emulated=True), RPI4B)
        assert board.capacity() == 2
        session = board.connect(session_timeout_s=30)
        assert session.describe()["threads"]  # a live aarch64 runtime answers
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 3  # the tracker and two qemu servers
        del session
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read().strip().endswith("stopped")
    finally:
        proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(gone(pid) for pid in children):
        time.sleep(0.1)
    assert all(gone(pid) for pid in children)


@needs_arm
@pytest.mark.slow
def test_tuning_on_an_emulated_board_keeps_its_own_database(tmp_path):
    model = models.save(models.MODELS["conv"](), tmp_path / "conv.onnx")
    args = ["compile", str(model), "--target", "rk3588", "--emulated", "--arm-runtime", ARM_RUNTIME]
    args += ["--trials", "4", "--tuning-dir", str(tmp_path / "tuning"), "-o", str(tmp_path / "out")]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["tuning"]["trials_measured"] == 4
    (database,) = (tmp_path / "tuning").iterdir()
    assert database.name.startswith("llvm-cortex-a76-") and database.name.endswith("-emulated")
