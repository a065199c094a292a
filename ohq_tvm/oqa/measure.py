"""Time workloads on a board over RPC and store every result the moment it is measured.

Each workload is lowered for the board's target on this machine as a model would be, its kernels
exported with the board's toolchain, uploaded, and timed with ``time_evaluator`` on synthetic inputs in
a fresh RPC session of its own (a kernel that crashes or hangs the session takes only that workload with
it; the session timeout bounds a hang). Every run finds its weights and output out of cache and its
input in cache, as inside a model (see :mod:`.kernel_timing`). One worker thread per server available
under the board's key measures in parallel. Timings wait for the board to run at its usual speed and
are done again when it slowed down meanwhile (:mod:`.quiet`); at the end of a run, the workloads timed
while the canary was slower than the run's fastest allows are timed once more. Progress hears of both:
a timing that waits for the board, and that last phase, as events of their own (:class:`MeasureEvent`).

Faults: a session that fails (the board died, the connection dropped, the timeout fired) puts the workload
back in the queue, for any worker, up to ``max_attempts`` times; then it is stored as failed with the
reason. A session that cannot even be opened does not count against the workload; when that happens
``max_attempts`` times in a row (each connection waits for a server to register first), or for longer
than the board's answer timeout (:mod:`ohq_tvm.board.deadlines`), the run stops with a
:class:`BoardError`; everything measured until then is already in the database. So does any other error
in a worker thread: it reaches the caller as one :class:`~ohq_tvm.errors.OHQError`, never a thread that
died and left the run waiting for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..board import Board, LoopbackBoard
from ..codegen.module import lower_for_board
from ..codegen.toolchain import Toolchain, find_toolchain
from ..codegen.tuning_database import TuningDatabase
from ..errors import BoardError, OHQError
from ..interrupts import reraise_interrupt
from ..targets import BoardSpec
from .database import LatencyDatabase
from .kernel_timing import KernelCall, build_kernel_library, time_kernels
from .latency_model import MIN_TRAINING_ROWS, LatencyModel
from .quiet import QuietGate, QuietWait
from .workloads import Workload

# Defaults of every timing config that does not say otherwise: how long a timing waits at most for the
# board to be quiet (see :mod:`.quiet`), and how many repeats of at least how many milliseconds it takes
# (fewer and shorter for a quick look, e.g. smoke tests; the numbers are then noisier).
QUIET_WAIT_ENV = "OHQ_TVM_QUIET_WAIT_S"
REPEAT_ENV = "OHQ_TVM_REPEAT"
MIN_REPEAT_ENV = "OHQ_TVM_MIN_REPEAT_MS"


def _from_env(name: str, default: float, kind: type = int):
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return kind(value)
    except ValueError:
        raise OHQError(
            f"${name} must be {'an integer' if kind is int else 'a number'}, not {value!r}"
        ) from None


@dataclass(frozen=True)
class TimingConfig:
    """How each workload is timed: ``repeat`` repeats of at least ``min_repeat_ms`` each, after ``warmup``
    runs (defaults ``$OHQ_TVM_REPEAT`` or 5, ``$OHQ_TVM_MIN_REPEAT_MS`` or 40); how often a failed session
    is retried; how long one workload's session may take; how long a timing waits at most for the board
    to run at its usual speed (``quiet_wait_s``, default ``$OHQ_TVM_QUIET_WAIT_S`` or 10 s; see
    :mod:`.quiet`)."""

    repeat: int = field(default_factory=lambda: _from_env(REPEAT_ENV, 5))
    min_repeat_ms: int = field(default_factory=lambda: _from_env(MIN_REPEAT_ENV, 40))
    warmup: int = 1
    max_attempts: int = 3
    workload_timeout_s: float = 120.0
    quiet_wait_s: float = field(default_factory=lambda: _from_env(QUIET_WAIT_ENV, 10.0, float))

    def __post_init__(self) -> None:
        if self.repeat < 1 or self.max_attempts < 1 or self.min_repeat_ms < 0 or self.quiet_wait_s < 0:
            raise OHQError(
                "timing needs repeat >= 1, max_attempts >= 1, min_repeat_ms >= 0 and quiet_wait_s >= 0"
            )


@dataclass(frozen=True)
class MeasureEvent:
    """Progress of a run, about one workload; ``done`` of ``total`` count the current phase. ``status``:

    - ``ok`` / ``failed``: its first timing finished (``latency_ms``) or it failed for good (``error``);
    - ``retry``: a session failed (``error``) and it was put back in the queue;
    - ``waiting``: its timing waits for the board to settle; ``wait`` says how long so far and up to what
      cap, and a last one how the wait ended (:class:`~.quiet.QuietWait`);
    - ``retiming`` / ``retimed``: the phase after the first pass, in which what was timed before the board
      had shown its usual speed is timed once more (``done`` of ``total`` count these): a re-timing starts
      / finished, with the new ``latency_ms`` or, when it failed (the first timing stands), ``error``.
    """

    workload: Workload
    status: str
    done: int
    total: int
    worker: str
    latency_ms: float | None = None
    error: str | None = None
    wait: QuietWait | None = None


@dataclass
class MeasureSummary:
    """What a run did: how many workloads were already stored, measured now, or failed (with why)."""

    fingerprint: str
    board: str
    schedule: str
    total: int
    reused: int
    measured: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)  # measurements per worker
    predicted_ms: dict[str, float] = field(default_factory=dict)  # left out by a budget, predicted
    model_mape_percent: float | None = None  # cross-validated error of those predictions
    retimed: int = 0  # timed again at the end: the canary had been slow (see :mod:`.quiet`)
    quiet: dict = field(default_factory=dict)  # the gate's record: fastest canary, waits
    emulation: str | None = (
        None  # what emulated the board, if it was emulated (its latencies are not the board's)
    )


def board_fingerprint(spec: BoardSpec, board: Board, device: dict[str, str]) -> tuple[str, dict]:
    """A stable id for (target, board key, what the board reports about itself, and what emulates it if
    it is emulated: such latencies are not the board's and are never mixed with its own), and its
    description."""
    description = {"target": spec.target_config, "key": board.identity, "device": device}
    if board.emulation is not None:
        description["emulated"] = board.emulation
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], description


# Bumped whenever the default schedule, the kernels it selects or the way a workload is timed change, so
# that latencies measured before are not mixed with new ones (they stay in the database under their old
# label). r3: kernels timed with their weights and output out of cache (:mod:`.kernel_timing`); r4: regular
# convs whose rows no power-of-two vector divides (ResNet's 14x14, 7x7) get the register-tiled schedule;
# r5: depthwise convs (float too) on the plane kernel, 1x1 convs register-tiled, int8 convs on stride-1
# rows with lanes over pixels, integer output stages and rounding vectorised; r6: the loopback board's
# servers run kernels on all physical cores (TVM's default had been half the logical CPUs on x86); r7:
# timed only while the board runs at its usual speed (the canary of :mod:`.quiet`); r8: vector widths from
# the target's features (AVX2 had been given AVX-512's 16 lanes), 1x1 convs along one pixel axis, int8
# layers on AVX2 without VNNI on the vpmaddwd kernels; r9: register tiles on the stack (they had been a
# workspace allocation per tile), element-wise ops over 14x14 planes as one flat loop; r10: float 1x1
# convs over maps the fp32 lanes do not divide (14x14, 7x7) in the fp32 channel form, residual adds inside
# the int8 kernels' tiles, no thread-pool launch for a loop of one iteration, int8 on AArch64 without
# dotprod (rpi4b) on smull + sadalp kernels.
MEASUREMENT_REVISION = 10


def schedule_label(schedule: str, tuning: TuningDatabase | None = None) -> str:
    """How measurements name the build they timed and how: ``default/r<N>``, ``none/r<N>``, or
    ``tuned/<database>/r<N>`` (the default schedule with that tuning database's records on top), ``N``
    being :data:`MEASUREMENT_REVISION`."""
    build = f"tuned/{tuning.path.name}" if tuning is not None else schedule
    return f"{build}/r{MEASUREMENT_REVISION}"


class Measurer:
    """Measures workloads on ``board`` (compiled for ``spec``) into ``database``."""

    def __init__(
        self,
        board: Board,
        spec: BoardSpec,
        database: LatencyDatabase,
        *,
        schedule: str = "default",
        timing: TimingConfig | None = None,
        workers: int | None = None,
        toolchain: Toolchain | None = None,
        tuning: TuningDatabase | None = None,
    ) -> None:
        self.board = board
        self.spec = spec
        self.database = database
        self.build_schedule = schedule
        self.tuning = tuning
        self.schedule = schedule_label(schedule, tuning)
        self.timing = timing or TimingConfig()
        self.workers = workers
        self.toolchain = toolchain
        # Emulated code's speed varies with the host's other work in ways no canary settles on (and its
        # latencies are not the board's anyway): no gate there.
        self.gate = QuietGate(max_wait_s=self.timing.quiet_wait_s, enabled=board.emulation is None)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The board's fingerprint (connects once to read what the board reports about itself)."""
        if self._fingerprint is None:
            session = self.board.connect(session_timeout_s=self.timing.workload_timeout_s)
            device = session._guard("reading the device description", session.describe)
            fingerprint, description = board_fingerprint(self.spec, self.board, device)
            self.database.add_board(fingerprint, self.board.label, description)
            self._fingerprint = fingerprint
        return self._fingerprint

    def _prioritise(self, pending: list[Workload], budget: int, summary: MeasureSummary) -> list[Workload]:
        rows = [
            m for m in self.database.measurements(self.fingerprint) if m.ok and m.schedule == self.schedule
        ]
        if len(rows) < MIN_TRAINING_ROWS:
            return pending[:budget]
        model = LatencyModel.train([m.workload for m in rows], [m.median_ms for m in rows])
        predicted = model.predict_ms(pending)
        # A conversion fused into a layer weighs in a plan what it adds to the layer, not its own time:
        # those come after every other workload.
        order = sorted(range(len(pending)), key=lambda i: (pending[i].fused_layer is not None, -predicted[i]))
        chosen = [pending[i] for i in sorted(order[:budget])]
        summary.predicted_ms = {pending[i].key: float(predicted[i]) for i in order[budget:]}
        summary.model_mape_percent = model.cv_mape_percent
        return chosen

    def latencies(self, workloads: Sequence[Workload]) -> dict[str, float]:
        """Stored median latencies (ms) of ``workloads`` on this board, by key."""
        return self.database.latencies(self.fingerprint, self.schedule, [w.key for w in workloads])

    def run(
        self,
        workloads: Sequence[Workload],
        progress: Callable[[MeasureEvent], None] | None = None,
        budget: int | None = None,
        retime: bool = False,
    ) -> MeasureSummary:
        """Measure what the database lacks (with ``retime``: every workload given, replacing its row);
        returns a summary. See the module docstring for faults.

        With a ``budget`` (at most that many measurements), the workloads the latency model trained on
        this board's stored rows predicts slowest are measured first (they weigh most in a plan's
        latency; conversions fused into a layer last), or model order without enough rows to train;
        the rest get predictions in ``summary.predicted_ms``, with the model's cross-validated error in
        ``summary.model_mape_percent``.
        """
        unique = list({w.key: w for w in workloads}.values())
        fingerprint = self.fingerprint
        pending = unique if retime else self.database.missing(fingerprint, self.schedule, unique)
        summary = MeasureSummary(
            fingerprint,
            self.board.label,
            self.schedule,
            total=len(unique),
            reused=len(unique) - len(pending),
            emulation=self.board.emulation,
        )
        if budget is not None and len(pending) > budget:
            pending = self._prioritise(pending, max(0, budget), summary)
        if not pending:
            return summary
        toolchain = self.toolchain or find_toolchain(self.spec.cross_triple)
        count = max(1, self.workers or self.board.capacity())
        # On the host board, building competes with measuring for the same cores: alternate them.
        overlap = not isinstance(self.board, LoopbackBoard)
        with tempfile.TemporaryDirectory(prefix="ohq-tvm-oqa-") as scratch:
            run = _Run(self, summary, pending, progress, toolchain.fcompile())
            threads = [
                threading.Thread(target=run.worker, args=(f"w{i}",), daemon=True) for i in range(count)
            ]
            for thread in threads:
                thread.start()
            try:
                for start in range(0, len(pending), count):
                    for index, workload in enumerate(pending[start : start + count], start):
                        run.submit(workload, Path(scratch) / f"{index}_{workload.key}.so")
                        # A Ctrl-C that landed in a finalizer (TVM's temporary folders are deleted in
                        # __del__, where Python drops exceptions) was swallowed: stop here instead.
                        reraise_interrupt()
                        if run.aborted is not None:
                            break
                    if not overlap or run.aborted is not None:
                        run.wait(threads)
                    reraise_interrupt()
                    if run.aborted is not None:
                        break
                run.wait(threads)
                # Once, again: what was timed before the gate had seen the board at its usual speed.
                suspects = run.suspects() if run.aborted is None else []
                summary.retimed = len(suspects)
                run.retime(suspects)
                run.wait(threads)
            finally:
                run.stop(len(threads))
                for thread in threads:
                    thread.join(timeout=5.0)
                summary.quiet = self.gate.to_json()
        if run.aborted is not None:
            raise BoardError(
                f"{run.aborted}; {summary.measured} new measurement(s) of {len(pending)} are stored in "
                f"{self.database.path}; rerun to measure the rest"
            ) from run.error
        return summary


class _Run:
    """The shared state of one :meth:`Measurer.run`: the work queue, counters, and the abort flag."""

    def __init__(
        self, measurer: Measurer, summary: MeasureSummary, pending: list[Workload], progress, fcompile
    ) -> None:
        self.m = measurer
        self.summary = summary
        self.pending = pending
        self.total = len(pending)
        self.progress = progress
        self.fcompile = fcompile
        self.queue: queue.Queue = queue.Queue()
        self.kernels: dict[str, list[KernelCall]] = {}  # by workload key: what its library times
        self.lock = threading.Lock()
        self.done = 0
        self.retime_total = 0  # set when the re-timing phase begins: the workloads it times again
        self.retimed = 0
        self.unreachable = 0  # consecutive sessions that could not even be opened
        self.unreachable_since = 0.0  # when the first of them began (time.monotonic())
        self.aborted: str | None = None  # why the run stops; workers skip what is left
        self.error: BaseException | None = None  # the error it stops on
        self.gate = measurer.gate
        self.canary: dict[str, float | None] = {}  # by workload key: the canary after its timing
        self.attempts: dict[str, int] = {}  # by workload key: the attempt its first timing succeeded at
        self.paths: dict[str, Path] = {}

    def _event(self, workload: Workload, status: str, worker: str, **extra) -> None:
        with self.lock:
            if status in ("ok", "failed"):
                self.done += 1
            elif status == "retimed":
                self.retimed += 1
            if self.retime_total:
                event = MeasureEvent(workload, status, self.retimed, self.retime_total, worker, **extra)
            else:
                event = MeasureEvent(workload, status, self.done, self.total, worker, **extra)
        if self.progress is not None:
            self.progress(event)

    def retime(self, workloads: Sequence[Workload]) -> None:
        """Begin the re-timing phase: queue ``workloads`` again, each keeping the attempts its first
        timing took (what its row records)."""
        if not workloads:
            return
        with self.lock:
            self.retime_total = len(workloads)
        for workload in workloads:
            self.queue.put((workload, self.paths[workload.key], self.attempts[workload.key]))

    def submit(self, workload: Workload, path: Path) -> None:
        """Lower, compile its kernels and export on this machine; a workload that does not build is stored
        as failed."""
        try:
            lowered = lower_for_board(workload.module(), self.m.spec, self.m.build_schedule, self.m.tuning)
            calls = build_kernel_library(lowered, self.m.spec, path, fcompile=self.fcompile)
        except Exception as err:  # BuildError, or TVM's own error types from export
            reraise_interrupt()
            reason = f"build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
            self._fail(workload, reason, attempts=1, worker="build")
            return
        with self.lock:
            self.kernels[workload.key] = calls
            self.paths[workload.key] = path
        self.queue.put((workload, path, 1))

    def suspects(self) -> list[Workload]:
        """Workloads timed while the canary was slower than the run's fastest allows: the run may have
        begun in a slow phase, before the gate knew the board's usual speed."""
        return [
            w
            for w in self.pending
            if self.canary.get(w.key) is not None and not self.gate.is_quiet(self.canary[w.key])
        ]

    def _fail(self, workload: Workload, reason: str, attempts: int, worker: str) -> None:
        self.m.database.record_failure(
            self.m.fingerprint, workload, self.m.schedule, reason, attempts=attempts, worker=worker
        )
        with self.lock:
            self.summary.failed[workload.key] = reason
        self._event(workload, "failed", worker, error=reason)

    def stop(self, workers: int) -> None:
        for _ in range(workers):
            self.queue.put(None)

    def wait(self, threads: Sequence[threading.Thread]) -> None:
        """Until the workers have taken everything queued, or the run is aborted.

        Polls instead of ``queue.join()``: the main thread stays responsive to Ctrl-C and SIGTERM (a
        signal raised inside a condition's wait can leave its lock released twice), and a worker that
        died anyway cannot leave it waiting for good.
        """
        while self.queue.unfinished_tasks and self.aborted is None:
            if not any(thread.is_alive() for thread in threads):
                self._abort(f"board {self.m.board.label}: every measuring thread stopped", None)
                return
            time.sleep(0.05)

    def _abort(self, reason: str, error: BaseException | None) -> None:
        with self.lock:
            if self.aborted is None:
                self.aborted, self.error = reason, error

    def worker(self, name: str) -> None:
        timing = self.m.timing
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            workload, path, attempt = item
            try:
                if self.aborted is not None:
                    continue
                self._measure(name, workload, path, attempt, timing)
            except Exception as err:  # handed to the main thread, which stops the run with it
                if isinstance(err, OHQError):
                    self._abort(str(err), err)
                else:
                    detail = str(err).strip().splitlines()
                    reason = f"{type(err).__name__}: {detail[-1]}" if detail else type(err).__name__
                    self._abort(f"board {self.m.board.label}: measuring {workload.key} failed: {reason}", err)
            finally:
                self.queue.task_done()

    def _measure(self, name: str, workload: Workload, path: Path, attempt: int, timing: TimingConfig) -> None:
        started = time.monotonic()
        with self.lock:
            retiming = workload.key in self.canary
        if retiming:
            self._event(workload, "retiming", name)
        try:
            session = self.m.board.connect(session_timeout_s=timing.workload_timeout_s)
        except BoardError as err:
            # Says nothing about the workload: put it back with the same attempt count.
            with self.lock:
                if self.unreachable == 0:
                    self.unreachable_since = started
                self.unreachable += 1
                deadline_s = self.m.board.answer_timeout_s
                too_long = deadline_s is not None and time.monotonic() - self.unreachable_since >= deadline_s
                if (self.unreachable >= timing.max_attempts or too_long) and self.aborted is None:
                    self.aborted, self.error = f"board {self.m.board.label} unreachable: {err}", err
            if self.aborted is None:
                self._event(workload, "retry", name, error=str(err))
                time.sleep(1.0)
                self.queue.put((workload, path, attempt))
            return
        with self.lock:
            self.unreachable = 0
        try:
            stats, canary = time_kernels(
                session,
                path,
                self.kernels[workload.key],
                repeat=timing.repeat,
                min_repeat_ms=timing.min_repeat_ms,
                warmup=timing.warmup,
                gate=self.gate,
                on_wait=lambda wait: self._event(workload, "waiting", name, wait=wait),
            )
        except BoardError as err:
            self._retry_or_fail(name, workload, path, attempt, str(err), timing)
            return
        finally:
            del session
        self.m.database.record(
            self.m.fingerprint, workload, self.m.schedule, stats, attempts=attempt, worker=name
        )
        with self.lock:
            first = workload.key not in self.canary
            self.canary[workload.key] = canary
            self.attempts.setdefault(workload.key, attempt)
            if first:
                self.summary.measured += 1
                self.summary.workers[name] = self.summary.workers.get(name, 0) + 1
        self._event(workload, "ok" if first else "retimed", name, latency_ms=stats.median_ms)

    def _retry_or_fail(
        self, name: str, workload: Workload, path: Path, attempt: int, reason: str, timing: TimingConfig
    ) -> None:
        if workload.key in self.canary:  # a re-timing that failed: the first timing stands
            self._event(workload, "retimed", name, error=reason)
            return
        if attempt < timing.max_attempts:
            self._event(workload, "retry", name, error=reason)
            self.queue.put((workload, path, attempt + 1))
        else:
            self._fail(workload, f"{reason} (after {attempt} attempts)", attempts=attempt, worker=name)


__all__ = ["MeasureEvent", "MeasureSummary", "Measurer", "TimingConfig", "board_fingerprint"]
