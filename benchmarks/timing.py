"""What the benchmark scripts share: arguments, timers, the machine record, writing results."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tvm

from ohq_tvm.board import LoopbackBoard, host_vm, use_host_threads
from ohq_tvm.oqa import LatencyDatabase
from ohq_tvm.oqa.quiet import QuietGate, canary_executable, canary_probe
from ohq_tvm.targets import resolve_target

Timer = Callable[[], float]


def tvm_timer(executable, args) -> Timer:
    """Milliseconds per run of ``main``, each call averaging over at least 100 ms."""
    vm = host_vm(executable)
    vm["main"](*args)
    evaluator = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=100)
    return lambda: evaluator(*args).results[0] * 1e3


def ort_timer(model, feeds, threads: int) -> Timer:
    """Milliseconds per ONNX Runtime run (all graph optimisations on), averaged over at least 100 ms."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)

    def run() -> float:
        count, started = 0, time.perf_counter()
        while True:
            session.run(None, feeds)
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= 0.1:
                return elapsed / count * 1e3

    return run


# After a run, a runtime's idle worker threads keep spinning before they sleep: TVM's for ~0.15 s of CPU
# (300,000 yields; measured after a MobileNetV2 run on this 2-core host), ONNX Runtime's for a while too.
# Timed right after another runtime, an engine shares the cores with those spinning threads: ONNX Runtime's
# MobileNetV2 went from 3.9 ms alone to 7-15 ms interleaved with a 2-thread TVM. So every timing starts
# after a pause longer than any spin.
SETTLE_S = 0.4


@functools.cache
def host_canary() -> Timer:
    """The quiet gate's canary (``ohq_tvm.oqa.quiet``) built for this machine: milliseconds per probe."""
    use_host_threads()  # the canary, like the timings it guards, on every core
    library = canary_executable(resolve_target("host").tvm_target()).jit()
    return canary_probe(library, tvm.cpu(), lambda step, action: action())


# This host has spells in which anything passing data between its two cores runs up to 1.9x slower (see
# ``ohq_tvm.oqa.quiet``); one gate for every interleaved timing of a benchmark process.
GATE = QuietGate(max_wait_s=30.0)


@dataclass(frozen=True)
class Rounds:
    """How a benchmark times its engines: ``repeats`` interleaved rounds (:func:`interleaved`), every
    engine on ``threads`` threads, each timing through ``gate``."""

    repeats: int
    threads: int
    gate: QuietGate = GATE


def interleaved(
    timers: dict[str, Timer], repeats: int, gate: QuietGate | None = GATE
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median and raw milliseconds, timing every runtime once per round so drift hits them alike, each
    timing after :data:`SETTLE_S` of quiet (see above) and, with a ``gate``, once the canary says the
    machine runs at its usual speed (a timing after which it does not is redone, up to twice)."""
    raw: dict[str, list[float]] = {key: [] for key in timers}
    for _ in range(repeats):
        for key, timer in timers.items():
            if gate is None:
                time.sleep(SETTLE_S)
                raw[key].append(timer())
            else:  # the canary runs TVM's pool: settle after it, not before
                raw[key].append(gate.time(host_canary(), timer, settle_s=SETTLE_S)[0])
    return {key: statistics.median(values) for key, values in raw.items()}, raw


def parse_args(doc: str, repeats: int, extra: dict[str, str] | None = None) -> argparse.Namespace:
    """``--repeats`` (interleaved rounds), ``--out`` (default: benchmarks/results), and ``extra``
    string options (``{"--models": default}``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    for flag, default in (extra or {}).items():
        parser.add_argument(flag, default=default)
    return parser.parse_args()


@contextmanager
def scratch_host_board(key: str) -> Iterator[tuple[LoopbackBoard, LatencyDatabase]]:
    """A loopback host board under ``key`` and a fresh measurement database, both gone afterwards (a
    benchmark measures from scratch, never from a user's cache)."""
    with (
        tempfile.TemporaryDirectory() as scratch,
        LoopbackBoard(key=key) as board,
        LatencyDatabase(Path(scratch) / "bench.sqlite") as db,
    ):
        yield board, db


def write_results(out_dir: str, name: str, record: dict, lines: list[str]) -> None:
    """``<name>.json`` (the full record) and ``<name>.md`` (the summary), and the summary on stdout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cpu_facts() -> dict:
    """The CPU's model name, family and model from /proc/cpuinfo, and its int8 dot-product flags."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value
    except OSError:
        return {}
    flags = fields.pop("flags", "").split()
    fields["int8_dot_product"] = [f for f in ("avx512_vnni", "avx_vnni", "asimddp") if f in flags]
    return fields


def machine_record(target, gate: QuietGate = GATE) -> dict:
    """The machine (TVM's CPU name, cores, threads, /proc/cpuinfo's facts), versions, the quiet ``gate``
    this process's interleaved timings went through, and the time."""
    return {
        "machine": {
            "cpu": str(target.attrs["mcpu"]),
            "cores": os.cpu_count(),
            "tvm_threads": use_host_threads(),  # in this process; the loopback board's servers alike
            "platform": platform.platform(),
            "cpu_model": cpu_facts(),
        },
        "versions": {"tvm": tvm.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
        "interleaved_timing_gate": gate.to_json() | {"max_wait_s": gate.max_wait_s},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class BenchmarkRun:
    """One benchmark process from its start: progress lines stamped with the seconds since, and the result
    record's header (:func:`machine_record`, and the settings with the wall time and the load average at
    the start and at the end: the machine is shared, and other work skews every timing)."""

    def __init__(self, name: str, target, gate: QuietGate = GATE) -> None:
        self.name, self.target, self.gate = name, target, gate
        self.started_s = time.perf_counter()
        self.load_before = os.getloadavg()

    def say(self, message: str) -> None:
        print(f"  [{time.perf_counter() - self.started_s:6.0f}s] {message}", flush=True)

    def record(self, settings: dict, **sections) -> dict:
        """``{"benchmark": name, machine..., "settings": settings + wall_s + load averages, **sections}``."""
        load = {"start": self.load_before, "end": os.getloadavg()}
        settings = settings | {
            "wall_s": round(time.perf_counter() - self.started_s, 1),
            "load_average_1_5_15_min": load,
        }
        return {
            "benchmark": self.name,
            **machine_record(self.target, self.gate),
            "settings": settings,
            **sections,
        }

    def write(
        self, out_dir: str, settings: dict, markdown: Callable[[dict], list[str]], file: str = "", **sections
    ) -> None:
        """The :meth:`record` and its ``markdown`` written as ``<file>.json`` / ``.md`` (default: the
        benchmark's name) in ``out_dir`` (:func:`write_results`)."""
        record = self.record(settings, **sections)
        write_results(out_dir, file or self.name, record, markdown(record))


def conditions(record: dict) -> str:
    """A markdown sentence on how a record's timings ran: rounds, the quiet gate, the load average."""
    settings, gate = record["settings"], record["interleaved_timing_gate"]
    load = settings["load_average_1_5_15_min"]
    waited = (
        f"after waiting up to {gate['max_wait_s']:.0f} s for the canary of `ohq_tvm.oqa.quiet` at its usual "
        f"speed ({gate['timings_that_waited']} timings waited, {gate['waited_s']:.0f} s in all)"
        if gate.get("canary_best_ms") is not None
        else "quiet gate not used"
    )
    return (
        f"Median of {settings['repeats']} interleaved rounds (each timing averages runs over at least "
        f"100 ms, {waited}); load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at "
        "the end."
    )
