"""The `ohq-tvm` command as a user runs it: exit codes, one-line errors, end-to-end compile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time

import psutil
import pytest

from ohq_tvm import cli, models, pipeline
from ohq_tvm.board import ANSWER_TIMEOUT_ENV, LatencyStats
from ohq_tvm.board.boards import _free_port
from ohq_tvm.cli import main, print_verification
from ohq_tvm.codegen.verify import OutputAgreement, Verification
from ohq_tvm.config import CalibrationConfig, PlanningConfig, TuningConfig, VerificationConfig
from ohq_tvm.oqa import LatencyDatabase
from ohq_tvm.targets import resolve_target

from testing_support import (
    OHQ_TVM,
    assert_one_line_error,
    gone,
    made_up_planning,
    nms_model,
    ohq,
    owned_processes,
    planned_on_unreliable_timing,
    silent_peer,
)


def test_targets_lists_the_builtin_boards():
    proc = ohq("targets")
    assert proc.returncode == 0
    names = {line.split()[0] for line in proc.stdout.splitlines()[1:]}
    assert {"host", "rpi4b", "rpi5", "rk3588", "jetson-orin-nano", "aarch64-linux-gnu"} <= names


def test_compile_end_to_end_on_the_host_board(tmp_path):
    model = tmp_path / "tiny.onnx"
    assert ohq("example-model", "tiny_cnn", "-o", str(model)).returncode == 0
    proc = ohq("compile", str(model), "--target", "host", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "matched ONNX Runtime" in proc.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert (tmp_path / "out" / "model.so").stat().st_size == manifest["library"]["bytes"]


def _verified(repeats_ms: tuple[float, ...]) -> Verification:
    output = OutputAgreement("logits", max_abs_error=1e-6, reference_scale=1.0)
    return Verification("host-loopback", 0, 1e-4, (output,), LatencyStats(repeats_ms))


def test_the_verified_latency_comes_with_its_spread_and_a_warning_when_noisy(capsys):
    # Steady: IQR 0.05 ms of a 6.1 ms median (0.8%), no warning.
    print_verification(_verified((6.0, 6.05, 6.1, 6.1, 6.2)))
    assert capsys.readouterr().out.splitlines() == [
        "ok: ran on host-loopback and matched ONNX Runtime, 6.100 ms median "
        "(IQR 0.050 ms, 0.8% of the median, over 5 repeats)"
    ]
    # A slow spell in the middle: IQR 1.4 ms of a 6.2 ms median (22.6%), above the 10% bound.
    print_verification(_verified((6.0, 6.1, 6.2, 7.5, 8.0)))
    ok, warning = capsys.readouterr().out.splitlines()
    assert ok.endswith("6.200 ms median (IQR 1.400 ms, 22.6% of the median, over 5 repeats)")
    assert warning == (
        "warning: the latency of the built model is noisy: its repeats spread by 22.6% of their median "
        "(IQR over 5 repeats), above the 10% a steady board stays within; the board was likely busy or in "
        "a slow spell, so the median may be off: time it again on a quiet board"
    )


@pytest.mark.parametrize("unreliable", [False, True])
def test_a_plan_chosen_from_contradicting_timings_is_never_a_bare_ok(
    tmp_path, monkeypatch, capsys, unreliable
):
    planning = made_up_planning()
    if unreliable:
        planning = planned_on_unreliable_timing(planning)
    # Measured as predicted: no warning that the plan's prediction missed.
    measured_ms = planning.plan.predicted["latency_ms"]
    verification = Verification(
        "host", 0, 5e-2, (OutputAgreement("y", 1e-3, 1.0),), LatencyStats((measured_ms,)), "onnxruntime-qdq"
    )

    def compiled(model, target, out_dir, **options):  # what compile_model returns after planning
        # The command's arguments arrive as configs, the defaults' where no flag was given.
        assert options["planning"] == PlanningConfig(budget="latency=1.1*int8")
        assert options["calibration"] == CalibrationConfig()
        assert options["verification"] == VerificationConfig()
        assert options["tuning"] == TuningConfig()
        out = tmp_path / "out"
        return pipeline.CompileResult(
            out,
            out / "model.so",
            out / "manifest.json",
            resolve_target("host"),
            planning.measurement.imported,
            verification,
            planning=planning,
        )

    monkeypatch.setattr(cli, "compile_model", compiled)  # the API entry point the command calls
    code = main(["compile", "m.onnx", "--budget", "latency=1.1*int8", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    status = "verified, planned on unreliable timings" if unreliable else "ok"
    assert (
        f"\n{status}: ran on host and matched ONNX Runtime on the QDQ export, {measured_ms:.3f} ms median"
        in out
    )
    if unreliable:
        assert "\nok:" not in "\n" + out
        assert out.strip().splitlines()[-1] == f"warning: {planning.timing_unreliable}"
        assert "uniform int8: its parts add up to" in out
    else:
        assert "warning" not in out


def test_missing_model_is_one_line(tmp_path):
    assert_one_line_error(ohq("compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path)), "nope.onnx")


def test_corrupt_model_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    assert_one_line_error(ohq("compile", str(bad), "-o", str(tmp_path / "o")), "bad.onnx")


def test_unknown_target_is_one_line_listing_boards(tmp_path):
    model = tmp_path / "m.onnx"
    models.save(models.MODELS["conv"](), model)
    proc = ohq("compile", str(model), "--target", "vax-11", "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "vax-11", "rpi4b")


def test_unreachable_tracker_is_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    models.save(models.MODELS["conv"](), model)
    port = _free_port("127.0.0.1")
    proc = ohq(
        "compile",
        str(model),
        "--tracker",
        f"127.0.0.1:{port}",
        "-o",
        str(tmp_path / "o"),
        timeout=60,
    )
    assert_one_line_error(proc, f"127.0.0.1:{port}", "tracker")


def test_a_tracker_that_never_answers_is_one_line_within_the_answer_timeout(tmp_path):
    model = tmp_path / "m.onnx"
    models.save(models.MODELS["conv"](), model)
    with silent_peer() as port:
        started = time.monotonic()
        args = ("measure", str(model), "--tracker", f"127.0.0.1:{port}", "--db", str(tmp_path / "m.sqlite"))
        proc = ohq(*args, env={ANSWER_TIMEOUT_ENV: "2"}, timeout=120)
        elapsed = time.monotonic() - started
    assert_one_line_error(
        proc, f"RPC tracker at 127.0.0.1:{port}", "no answer within 2 s", ANSWER_TIMEOUT_ENV
    )
    assert elapsed < 30  # the command's start (TVM's import) and the 2 s


@pytest.mark.slow  # 15-16 s each on a 2-core host, most of it the command's and the board's start
@pytest.mark.parametrize("stop", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])
def test_a_hung_up_or_killed_run_leaves_no_server_behind(tmp_path, stop):
    # A dropped ssh session (SIGHUP) stops a run as SIGTERM does: its tracker, servers, their workers and
    # temporary folders go. SIGKILL leaves no time to clean up: the servers die with the run anyway.
    model, scratch = tmp_path / "m.onnx", tmp_path / "tmp"
    models.save(models.tiny_cnn(), model)
    scratch.mkdir()
    run = subprocess.Popen(
        [str(OHQ_TVM), "measure", str(model), "--db", str(tmp_path / "m.sqlite")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("ohq-tvm-oqa-*")):  # measuring has begun: the board is up
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        # the tracker, the server and its popen_workers (and the owner watches of tracker and server)
        started = [child.pid for child in psutil.Process(run.pid).children(recursive=True)]
        assert len(started) >= 4 and set(owned_processes(run.pid)) <= set(started), started
        run.send_signal(stop)
        _, stderr = run.communicate(timeout=30)
    finally:
        run.kill()
    deadline = time.monotonic() + 5
    while not all(gone(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in started if not gone(pid)] == []
    assert not owned_processes(run.pid)
    if stop == signal.SIGHUP:
        assert run.returncode == 128 + signal.SIGHUP and "stopped by SIGHUP" in stderr.splitlines(), stderr
        assert not list(scratch.glob("ohq-tvm-*"))  # the board's ohq-tvm-rpc-*, measuring's ohq-tvm-oqa-*
    else:
        assert run.returncode == -signal.SIGKILL


@pytest.mark.parametrize("bad", ["input", "input=1,x,3", "=1,2"])
def test_bad_input_shape_is_one_line(tmp_path, bad):
    model = tmp_path / "m.onnx"
    models.save(models.MODELS["conv"](), model)
    proc = ohq("compile", str(model), "--input-shape", bad, "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, bad)


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_compile_int8_verifies_against_the_qdq_export(tmp_path):
    model = tmp_path / "tiny.onnx"
    assert ohq("example-model", "tiny_cnn", "-o", str(model)).returncode == 0
    out = tmp_path / "out"
    proc = ohq(
        "compile",
        str(model),
        "--precision",
        "int8",
        "--calibration",
        "percentile",
        "--synthetic",
        "matched",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "matched ONNX Runtime on the QDQ export" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["counts"] == {"int8": 7}
    assert manifest["verification"]["reference"].startswith("onnxruntime-qdq")
    assert manifest["verification"]["passed"] is True
    plan = json.loads((out / "plan.json").read_text())
    assert plan["calibration"] == "percentile" and plan["target"] == "host"
    assert json.loads((out / "calibration.json").read_text())["source"] == "synthetic:matched"
    # The plan file drives a second compile: fp32 edges, int4w in the middle.
    plan["assignments"].update(stem_conv="fp32", classifier="fp32", dw2="int4w")
    (tmp_path / "mixed.json").write_text(json.dumps(plan))
    proc = ohq("compile", str(model), "--plan", str(tmp_path / "mixed.json"), "-o", str(tmp_path / "mixed"))
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((tmp_path / "mixed" / "manifest.json").read_text())["plan"]["counts"]
    assert counts == {"fp32": 2, "int8": 4, "int4w": 1}


@pytest.mark.slow  # 40-45 s on a 2-core host (several CLI runs): `make test-slow`
def test_bad_plans_are_one_line(tmp_path):
    model = tmp_path / "tiny.onnx"
    assert ohq("example-model", "tiny_cnn", "-o", str(model)).returncode == 0
    assert_one_line_error(
        ohq("compile", str(model), "--precision", "fp16", "-o", str(tmp_path / "o")), "fp16", "host"
    )
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"format": "ohq-tvm/plan", "format_version": 1, "assignments": {"stem": "int8"}})
    )
    assert_one_line_error(
        ohq("compile", str(model), "--plan", str(plan), "-o", str(tmp_path / "o")), "'stem'"
    )
    assert_one_line_error(
        ohq(
            "compile",
            str(model),
            "--precision",
            "int8",
            "--calibration-samples",
            str(tmp_path / "none"),
            "-o",
            str(tmp_path / "o"),
        ),
        "do not exist",
    )


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_measure_fills_the_database_then_reuses_it(tmp_path):
    model = models.save(models.conv_model(channels=8, size=8), tmp_path / "conv.onnx")
    db = tmp_path / "oqa.sqlite"
    args = ["measure", str(model), "--db", str(db), "--precisions", "fp32,int8", "--repeat", "2"]
    first = ohq(*args, "--min-repeat-ms", "5")
    assert first.returncode == 0, first.stderr
    table = first.stdout.splitlines()
    header = next(line for line in table if line.startswith("layer"))
    assert "fp32 ms" in header and "int8 ms" in header and "quantize ms" in header
    row = next(line for line in table if line.startswith("conv0"))
    fp32_ms, int8_ms, quantize_ms, dequantize_ms = (float(cell) for cell in row.split()[2:6])
    # The model input's quantize is an operator of its own; the dequantize is fused into the int8 conv
    # and costs what it adds to it, of either sign.
    assert fp32_ms > 0 and int8_ms > 0 and quantize_ms > 0 and abs(dequantize_ms) < int8_ms
    assert "measured 4, reused 0, failed 0" in first.stdout
    second = ohq(*args)
    assert second.returncode == 0, second.stderr
    assert "measured 0, reused 4, failed 0" in second.stdout

    shown = ohq("db", "show", "--db", str(db), "-v")
    assert shown.returncode == 0 and "4 rows" in shown.stdout and "conv2d 1x3x8x8" in shown.stdout
    exported = ohq("db", "export", "--db", str(db), "-o", str(tmp_path / "rows.json"))
    assert exported.returncode == 0, exported.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["measurements"]
    assert len(rows) == 4 and all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    cleared = ohq("db", "clear", "--db", str(db))
    assert "deleted 4 measurements" in cleared.stdout


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_measure_with_tuning_times_the_tuned_operators_apart(tmp_path):
    model = models.save(models.conv_model(channels=8, size=8), tmp_path / "conv.onnx")
    db = tmp_path / "oqa.sqlite"
    common = ["--db", str(db), "--precisions", "fp32,int8", "--repeat", "2", "--min-repeat-ms", "5"]
    tuned = ohq("measure", str(model), *common, "--trials", "8", "--tuning-dir", str(tmp_path / "tuning"))
    assert tuned.returncode == 0, tuned.stderr
    assert "measured 4, reused 0, failed 0" in tuned.stdout
    labels = {m["schedule"] for m in json.loads(ohq("db", "export", "--db", str(db)).stdout)["measurements"]}
    assert len(labels) == 1 and labels.pop().startswith("tuned/")
    # The default-schedule measurements are a separate set: nothing of them is in the database yet.
    plain = ohq("measure", str(model), *common)
    assert "measured 4, reused 0, failed 0" in plain.stdout


def test_measure_rejects_a_precision_the_board_lacks(tmp_path):
    model = models.save(models.conv_model(channels=8, size=8), tmp_path / "conv.onnx")
    proc = ohq("measure", str(model), "--db", str(tmp_path / "x.sqlite"), "--precisions", "fp16")
    assert_one_line_error(proc, "fp16")


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_plan_meets_a_size_budget_and_compiles(tmp_path):
    model = models.save(models.tiny_cnn(), tmp_path / "tiny.onnx")
    db, plan_path = tmp_path / "oqa.sqlite", tmp_path / "plan.json"
    common = ["--db", str(db), "--precisions", "fp32,int8", "--batches", "1"]
    proc = ohq("plan", str(model), *common, "--size-mb", "0.008", "--pareto", "4", "-o", str(plan_path))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(plan_path.read_text())
    assert plan["source"] == "ilp" and plan["predicted"]["size_bytes"] <= 8000
    assert "int8" in plan["assignments"].values()
    assert {"chosen", "fp32", "int8", "bops-proxy"} <= {
        line.split()[0] for line in proc.stdout.splitlines() if line
    }
    assert (tmp_path / "plan.sensitivity.json").is_file() and (tmp_path / "plan.frontier.json").is_file()
    # --mqe-data auto: the model has BatchNormalization statistics, so MQE ran on distilled inputs.
    assert json.loads((tmp_path / "plan.sensitivity.json").read_text())["data"] == "synthetic:distilled"
    built = ohq("compile", str(model), "--plan", str(plan_path), "-o", str(tmp_path / "out"))
    assert built.returncode == 0, built.stderr
    too_fast = ohq("plan", str(model), *common, "--latency-ms", "0.000001", "-o", str(plan_path))
    assert_one_line_error(too_fast, "smallest any plan reaches")


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_compile_with_trials_tunes_on_the_board_then_reuses_the_database(tmp_path, loopback_board):
    model = models.save(models.conv_model(channels=8, size=8), tmp_path / "conv.onnx")
    tune = ["--trials", "4", "--tuning-dir", str(tmp_path / "tuning")]
    board = ["--tracker", loopback_board.tracker_address, "--key", loopback_board.key]
    first = ohq("compile", str(model), *board, *tune, "-o", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "tuned: 4 trials measured (0 failed), 0 of 1 tasks from the database" in first.stdout
    assert "4/4" in first.stderr  # the progress bar
    assert "matched ONNX Runtime" in first.stdout
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["tuning"]["trials_measured"] == 4 and manifest["tuning"]["tasks"] == 1
    assert manifest["verification"]["passed"] is True
    # Same model again: nothing to measure (so no board is needed), the database's schedule is used.
    second = ohq("compile", str(model), *tune, "--no-verify", "-o", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert "tuned: 0 trials measured (0 failed), 1 of 1 tasks from the database" in second.stdout
    assert_one_line_error(
        ohq("compile", str(model), *tune, "--schedule", "none", "-o", str(tmp_path / "c")), "schedule"
    )


@pytest.mark.slow  # 16-19 s on a 2-core host (CLI runs): `make test-slow`
def test_plan_files_of_the_wrong_shape_are_one_line(tmp_path):
    model = models.save(models.tiny_cnn(), tmp_path / "tiny.onnx")
    listed, bare = tmp_path / "listed.json", tmp_path / "bare.json"
    listed.write_text(json.dumps([{"stem_conv": "int8"}]))
    bare.write_text(json.dumps({"format": "ohq-tvm/plan", "format_version": 1}))
    for plan, words in ((listed, ["listed.json", "JSON object"]), (bare, ["bare.json", "'assignments'"])):
        proc = ohq("compile", str(model), "--plan", str(plan), "--no-verify", "-o", str(tmp_path / "o"))
        assert_one_line_error(proc, *words)


def existing_database(path) -> str:
    """A measurement database holding one board and nothing measured, as `db export` reads."""
    with LatencyDatabase(path) as db:
        db.add_board("fp", "board", {"key": "k"})
    return str(path)


@pytest.mark.slow  # 40-45 s on a 2-core host (several CLI runs): `make test-slow`
def test_unusable_output_paths_are_one_line(tmp_path):
    model = models.save(models.tiny_cnn(), tmp_path / "tiny.onnx")
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should go")
    compiled = ohq("compile", str(model), "--no-verify", "-o", str(taken))
    assert_one_line_error(compiled, str(taken), "not a folder")
    assert taken.read_text() == "a file where the output folder should go"
    unwritable = "/proc/nope/out"  # a folder no user, root included, can create
    assert_one_line_error(ohq("compile", str(model), "--no-verify", "-o", unwritable), unwritable)
    assert_one_line_error(ohq("example-model", "tiny_cnn", "-o", "/proc/nope/x.onnx"), "/proc/nope/x.onnx")
    db = existing_database(tmp_path / "m.sqlite")
    assert_one_line_error(ohq("db", "export", "--db", db, "-o", "/proc/nope.json"), "/proc/nope.json")
    missing = tmp_path / "missing" / "rows.json"
    assert_one_line_error(ohq("db", "export", "--db", db, "-o", str(missing)), str(missing.parent))
    assert not missing.parent.exists()
    measured = ohq("measure", str(model), "--db", "/proc/nope/x.sqlite")
    assert_one_line_error(measured, "/proc/nope/x.sqlite", "--db")


def test_an_input_shape_contradicting_a_static_dimension_is_refused(tmp_path):
    model = models.save(models.tiny_cnn(), tmp_path / "tiny.onnx")
    proc = ohq("compile", str(model), "--input-shape", "input=1,3,64,64", "--no-verify", "-o", str(tmp_path))
    assert_one_line_error(proc, "'input'", "1x3x32x32", "1x3x64x64")
    assert not (tmp_path / "model.so").exists()


def test_an_operator_the_build_cannot_hold_is_named_in_one_line(tmp_path):
    model = models.save(nms_model(), tmp_path / "nms.onnx")
    proc = ohq("compile", str(model), "--no-verify", "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, "nms.onnx", "nms (NonMaxSuppression)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["measure", "M", "--workers", "-2"], ["--workers", "-2", "positive"]),
        (["measure", "M", "--workers", "0"], ["--workers", "0", "positive"]),
        (["measure", "M", "--budget", "-1"], ["--budget", "-1", "positive"]),
        (["measure", "M", "--precisions", ","], ["--precisions", "','", "fp32,int8"]),
        (["plan", "M", "--precisions", "", "-o", "p.json"], ["--precisions", "''"]),
        (["compile", "M", "--precisions", "fp32,,int8", "-o", "o"], ["--precisions", "'fp32,,int8'"]),
    ],
)
def test_non_positive_counts_and_empty_precision_lists_are_refused_when_parsed(tmp_path, args, words):
    model = tmp_path / "never-read.onnx"  # refused before the model is read
    proc = ohq(*[str(model) if arg == "M" else arg for arg in args])
    assert_one_line_error(proc, *words)


def test_a_target_that_is_not_a_cpu_is_refused(tmp_path):
    model = models.save(models.tiny_cnn(), tmp_path / "tiny.onnx")
    proc = ohq(
        "compile", str(model), "--target", '{"kind": "cuda"}', "--no-verify", "-o", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "'cuda'", '"llvm"')
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # 16-19 s on a 2-core host (CLI runs): `make test-slow`
def test_db_show_of_a_missing_database_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "m.sqlite"
    for action in ("show", "export"):
        assert_one_line_error(ohq("db", action, "--db", str(missing)), str(missing), "does not exist")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow  # 16-19 s on a 2-core host (CLI runs): `make test-slow`
def test_outputs_replace_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("not to be overwritten")
    db = existing_database(tmp_path / "m.sqlite")
    for args in (["db", "export", "--db", db], ["example-model", "tiny_cnn"]):
        link = tmp_path / f"link-{args[0]}"
        link.symlink_to(victim)
        proc = ohq(*args, "-o", str(link))
        assert proc.returncode == 0, proc.stderr
        assert victim.read_text() == "not to be overwritten"
        assert not link.is_symlink() and link.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
