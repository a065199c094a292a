"""Tune a Relax module's fused TIR functions with MetaSchedule, measuring candidates on the board.

Each fused TIR function (a *task*) whose workload has no valid record in the target's
:class:`~ohq_tvm.codegen.tuning_database.TuningDatabase` is tuned: evolutionary search guided by
MetaSchedule's XGBoost cost model, candidates compiled here (cross-compiled and linked with our toolchain for
other architectures) and timed on the board through an RPC tracker (MetaSchedule's ``RPCRunner``). Tasks that
already have a record, from this model or any other on the same target, are not measured again: a second run
over the same module measures nothing. Every record is appended to the database as it is measured, so an
interrupted run keeps what it found. After the search the few best records of each task and its default
schedule are timed again side by side, and the fastest is the one builds take;
:func:`~ohq_tvm.codegen.tuned_build.build_tuned` then builds with it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..board import Board
from ..errors import TuningError
from ..interrupts import reraise_interrupt
from ..targets import BoardSpec
from .schedules import CPUDefaultRule
from .toolchain import find_toolchain
from .tune_builder import CandidateBuilder
from .tuned_build import fuse
from .tuning_database import TuningDatabase

_MAX_TRIALS_PER_ROUND = 64  # MetaSchedule's default batch: one search round, one build, one run
_MAX_POPULATION = 512  # MetaSchedule's default evolutionary population
_CONFIRM_TOP_K = 3  # the search's best records re-timed before a build takes one
_CONFIRM_ROUNDS = 3
_MIN_POPULATION = 64
_FAILED_S = 1e9  # MetaSchedule stores a failed measurement as 1e10 s


@dataclass(frozen=True)
class TuningProgress:
    """Reported when the search starts (``trials_done`` 0, no ``task``) and after each measured batch.

    ``trials_done`` may end slightly above ``trials_total``: MetaSchedule checks the budget per batch.
    """

    trials_done: int
    trials_total: int
    task: str  # the task just measured
    best_ms: float | None  # the best latency of ``task`` measured so far in this run


@dataclass(frozen=True)
class TaskTuning:
    """One tuning task: a fused TIR function (``weight``: how many calls in the module share it)."""

    name: str
    weight: int
    reused: bool  # had a record before this run, so nothing was measured for it
    best_ms: float | None  # best recorded latency on the board; ``None`` when nothing valid is recorded


@dataclass
class TuneResult:
    """What :func:`tune_module` did. ``trials_measured`` counts this run's candidates, failed included."""

    tasks: list[TaskTuning]
    trials_measured: int
    trials_failed: int
    database: TuningDatabase  # open, with this run's records: build with it
    wall_s: float
    first_error: str | None = None

    @property
    def database_path(self) -> Path:
        return self.database.path

    @property
    def tasks_reused(self) -> int:
        return sum(1 for task in self.tasks if task.reused)

    @property
    def best_ms(self) -> dict[str, float | None]:
        return {task.name: task.best_ms for task in self.tasks}

    def to_json(self) -> dict:
        return {
            "tasks": len(self.tasks),
            "tasks_reused": self.tasks_reused,
            "trials_measured": self.trials_measured,
            "trials_failed": self.trials_failed,
            "database": str(self.database_path),
            "wall_s": round(self.wall_s, 3),
            "best_ms": self.best_ms,
        }


ProgressCallback = Callable[[TuningProgress], None]


@derived_object
class _CountMeasurements(ms.measure_callback.PyMeasureCallback):
    """Counts measured candidates and failures, tracks each task's best, and reports progress."""

    def __init__(self, trials_total: int, progress: ProgressCallback | None) -> None:
        self.trials_total = trials_total
        self.progress = progress
        self.measured = 0
        self.failed = 0
        self.first_error: str | None = None
        self.best_s: dict[str, float] = {}

    def start(self) -> None:
        """Report the start of the search (which takes seconds before the first batch is measured)."""
        if self.progress is not None:
            self.progress(TuningProgress(0, self.trials_total, "", None))

    def finish(self, confirmed: dict[str, float]) -> None:
        """Report the re-timed winners (:func:`_confirm_best`) as the final best of their tasks."""
        self.best_s.update(confirmed)
        if self.progress is not None and confirmed:
            name = next(reversed(confirmed))
            self.progress(TuningProgress(self.measured, self.trials_total, name, _ms(confirmed[name])))

    def apply(self, task_scheduler, task_id, _candidates, builder_results, runner_results) -> None:
        name = str(task_scheduler.tasks_[task_id].ctx.task_name)
        for built, ran in zip(builder_results, runner_results, strict=True):
            self.measured += 1
            error = built.error_msg or ran.error_msg
            seconds = [float(s) for s in ran.run_secs or []]
            if error or not seconds or max(seconds) >= _FAILED_S:
                self.failed += 1
                self.first_error = self.first_error or _last_line(error or "no run time reported")
                continue
            self.best_s[name] = min(_mean(seconds), self.best_s.get(name, math.inf))
        if self.progress is not None:
            best = self.best_s.get(name)
            self.progress(TuningProgress(self.measured, self.trials_total, name, _ms(best)))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else str(text)


@contextmanager
def _task_logger(tuning: TuningDatabase) -> Iterator[logging.Logger]:
    """MetaSchedule's per-task log goes to ``<database>/logs/tune.log``, not to the console."""
    logger = logging.getLogger("ohq_tvm.codegen.tune.metaschedule")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    (tuning.path / "logs").mkdir(exist_ok=True)
    handler = logging.FileHandler(tuning.path / "logs" / "tune.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextmanager
def _workers_import_installed_packages() -> Iterator[None]:
    """Keep the working directory off the ``sys.path`` of worker processes started inside the block.

    TVM starts workers as ``python -m tvm.exec.popen_worker``, which puts the working directory first on
    ``sys.path``; run from a source checkout, a builder worker would import the checkout's ``ohq_tvm``
    folder (without the packages installed from other folders) to unpickle its job, and fail. Python's
    safe-path mode (3.11+, ``PYTHONSAFEPATH``) leaves the working directory out.
    """
    previous = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONSAFEPATH", None)
        else:
            os.environ["PYTHONSAFEPATH"] = previous


def _builder_workers(trials_per_round: int) -> int:
    """One builder process per 16 candidates of a batch, at most one per core: a candidate builds and
    links in about 0.2 s, while starting a worker (it imports TVM) takes seconds."""
    return max(1, min(os.cpu_count() or 1, trials_per_round // 16))


def _search_strategy(trials_per_round: int) -> ms.search_strategy.EvolutionarySearch:
    """Evolutionary search whose population scales with the batch: a 512-strong population for an
    8-candidate batch costs half a minute of mutation on two cores and buys nothing."""
    population = min(_MAX_POPULATION, max(_MIN_POPULATION, 8 * trials_per_round))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2)
    )


def tune_module(
    mod: tvm.IRModule,
    board_spec: BoardSpec,
    board: Board,
    trials: int,
    *,
    tuning_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    min_repeat_ms: int = 40,
    session_timeout_s: int = 60,
    seed: int = 0,
) -> TuneResult:
    """Tune every fused TIR function of ``mod`` for ``board_spec`` on ``board`` with ``trials`` in total.

    Args:
        mod: a Relax module (before legalization: it is fused here exactly as the build will fuse it).
        board_spec: the board's description (its TVM target, triple and core count).
        board: where candidates run; it must hand out sessions through an RPC tracker (a
            :class:`~ohq_tvm.board.TrackerBoard`, or a :class:`~ohq_tvm.board.LoopbackBoard`, started on
            first use). Not contacted at all when every task is already in the database.
        trials: candidates to measure in total over the tasks still untuned (at least 1). Tasks left
            without a valid record (budget spent elsewhere, or every candidate failed) keep the default
            schedule when built.
        tuning_dir: root of the per-target databases (default: :func:`default_tuning_root`).
        progress: called with a :class:`TuningProgress` when the search starts and after each measured
            batch (not at all when nothing is measured).
        min_repeat_ms: minimum length of one timed repeat on the board.
        session_timeout_s: how long one candidate's RPC session (upload, load, timing) may take.
        seed: seed of the search.

    Raises :class:`TuningError` for a budget below 1, a non-CPU target, an unusable tuning directory,
    a search that fails, or when every candidate measured fails (the message carries the first error);
    :class:`~ohq_tvm.errors.BoardError` when the board has no tracker or cannot be reached.
    """
    started = time.perf_counter()
    if trials < 1:
        raise TuningError(f"the tuning budget must be at least 1 trial, not {trials}")
    tuning = TuningDatabase.open(board_spec, tuning_dir, emulated=board.emulation is not None)
    if tuning.target.kind.name != "llvm":
        raise TuningError(f"board {board_spec.name}: tuning supports CPU (llvm) targets only")
    try:
        extracted = ms.relax_integration.extract_tasks(fuse(mod, tuning.target), tuning.target)
    except Exception as err:  # TVM raises builtin types
        raise TuningError(f"extracting tuning tasks failed: {_last_line(str(err))}") from err
    reused = [tuning.best_seconds(task.dispatched[0]) is not None for task in extracted]
    pending = [task for task, known in zip(extracted, reused, strict=True) if not known]
    counter = _CountMeasurements(trials, progress)
    if pending:
        _search(pending, tuning, board_spec, board, trials, counter, min_repeat_ms, session_timeout_s, seed)
    tasks = [
        TaskTuning(
            name=str(task.task_name),
            weight=int(task.weight),
            reused=known,
            best_ms=_ms(tuning.best_seconds(task.dispatched[0])),
        )
        for task, known in zip(extracted, reused, strict=True)
    ]
    if counter.measured and counter.failed == counter.measured:
        raise TuningError(
            f"all {counter.measured} candidates failed on {board.label}: {counter.first_error} "
            f"(MetaSchedule's log: {tuning.path / 'logs' / 'tune.log'})"
        )
    return TuneResult(
        tasks=tasks,
        trials_measured=counter.measured,
        trials_failed=counter.failed,
        database=tuning,
        wall_s=time.perf_counter() - started,
        first_error=counter.first_error,
    )


def _search(
    pending: list[ms.ExtractedTask],
    tuning: TuningDatabase,
    board_spec: BoardSpec,
    board: Board,
    trials: int,
    counter: _CountMeasurements,
    min_repeat_ms: int,
    session_timeout_s: int,
    seed: int,
) -> None:
    """Run MetaSchedule over ``pending``; its builder and runner worker pools are always shut down."""
    host, port, key = board.rpc_tracker()  # BoardError here, before any worker process starts
    toolchain = find_toolchain(board_spec.cross_triple)
    trials_per_round = max(1, min(_MAX_TRIALS_PER_ROUND, math.ceil(trials / len(pending))))
    with _task_logger(tuning) as logger, _workers_import_installed_packages(), ExitStack() as cleanup:
        contexts = [
            ms.TuneContext(
                mod=task.dispatched[0],
                target=tuning.target,
                space_generator="post-order-apply",
                search_strategy=_search_strategy(trials_per_round),
                task_name=str(task.task_name),
                rand_state=seed + index + 1,  # 0 is not a valid MetaSchedule seed
                num_threads="physical",
                logger=logger,
            ).clone()
            for index, task in enumerate(pending)
        ]
        builder = CandidateBuilder(toolchain, workers=_builder_workers(trials_per_round))
        cleanup.callback(builder.close)
        runner = ms.runner.RPCRunner(
            ms.runner.RPCConfig(host, port, key, session_timeout_sec=session_timeout_s),
            ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=min_repeat_ms),
            max_workers=board.capacity(),
        )
        cleanup.callback(runner.pool.shutdown)
        # The progress bar's "best" starts from the default schedules: a build gets them when the
        # search finds nothing faster.
        defaults = _commit_default_schedules(pending, tuning, builder, runner)
        counter.best_s.update({name: _mean(record.run_secs) for name, record in defaults.items()})
        counter.start()
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[float(task.weight) for task in pending],
                work_dir=str(tuning.path),
                max_trials_global=trials,
                max_trials_per_task=trials,
                num_trials_per_iter=trials_per_round,
                builder=builder,
                runner=runner,
                database=tuning.database,
                cost_model=ms.cost_model.XGBModel(num_tuning_cores=os.cpu_count() or 1),
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter],
                task_scheduler=ms.task_scheduler.GradientBased(seed=seed + 1),
            )
            counter.finish(_confirm_best(pending, tuning, builder, runner, defaults))
        except Exception as err:  # TVM raises builtin types from C++ and from its worker pools
            reraise_interrupt()
            raise TuningError(
                f"tuning on {board.label} failed: {_last_line(str(err))} "
                f"(MetaSchedule's log: {tuning.path / 'logs' / 'tune.log'})"
            ) from err


def _commit_default_schedules(
    pending: list[ms.ExtractedTask], tuning: TuningDatabase, builder, runner
) -> dict[str, ms.database.TuningRecord]:
    """Time each task's zero-budget schedule on the board like any candidate and store it as a record.

    The search then starts from it (MetaSchedule seeds its population from the database), and it is
    re-timed with the search's best records (:func:`_confirm_best`), so a tuned build does not take a
    candidate slower than the default: at small budgets MetaSchedule's own candidates often are. These
    measurements are not counted against the budget.
    A default schedule that fails to build or run is skipped (the search goes on without it). Returns
    the record of each task's default schedule that ran, by task name.
    """
    rule = CPUDefaultRule()
    scheduled = []
    for task in pending:
        mod = task.dispatched[0]
        (gvar,) = mod.get_global_vars()
        sch = rule.apply(mod[gvar], tuning.target, False)
        if sch is not None and sch.trace is not None:
            scheduled.append((str(task.task_name), mod, sch))
    if not scheduled:
        return {}
    built = builder.build([ms.builder.BuilderInput(sch.mod, tuning.target) for _, _, sch in scheduled])
    inputs, measured, records = [], [], {}
    for (name, mod, sch), result in zip(scheduled, built, strict=True):
        if result.error_msg is None:
            args_info = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
            inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu", args_info))
            measured.append((name, mod, sch, args_info))
    for (name, mod, sch, args_info), future in zip(measured, runner.run(inputs), strict=True):
        result = future.result()
        if result.error_msg is not None or not result.run_secs:
            continue
        seconds = [float(s) for s in result.run_secs]
        record = ms.database.TuningRecord(
            sch.trace, tuning.database.commit_workload(mod), seconds, tuning.target, args_info
        )
        tuning.database.commit_tuning_record(record)
        if max(seconds) < _FAILED_S:
            records[name] = record
    return records


def _confirm_best(
    pending: list[ms.ExtractedTask],
    tuning: TuningDatabase,
    builder,
    runner,
    defaults: dict[str, ms.database.TuningRecord],
) -> dict[str, float]:
    """Re-time each task's few best records side by side; the fastest becomes the record builds take.

    The search times each candidate once (a few runs in a row). On a noisy board one lucky timing can
    put a candidate ahead of the default schedule that it then loses to in every later run (seen on the
    2-core host: a stem conv at 0.6 ms where the default takes 0.25). So the ``_CONFIRM_TOP_K`` best
    records, and the default schedule's, run again in ``_CONFIRM_ROUNDS`` rounds, every candidate once
    per round; the lowest median wins and goes to ``tuning.confirmed`` with its per-round times.
    Returns each winner's mean over those rounds by task name (a task with a single candidate keeps its
    search timing, without re-running).
    """
    confirmed: dict[str, float] = {}
    for task in pending:
        name, mod = str(task.task_name), task.dispatched[0]
        if not tuning.database.has_workload(mod):
            continue
        records = list(tuning.database.get_top_k(tuning.database.commit_workload(mod), _CONFIRM_TOP_K))
        candidates = [record.as_measure_candidate() for record in records]
        default = defaults.get(name)
        if default is not None:
            scheduled = default.as_measure_candidate()
            if not any(tvm_ffi.structural_equal(scheduled.sch.mod, c.sch.mod) for c in candidates):
                records.append(default)
                candidates.append(scheduled)
        if not records:
            continue
        built = builder.build([ms.builder.BuilderInput(c.sch.mod, tuning.target) for c in candidates])
        runnable = [
            (record, ms.runner.RunnerInput(result.artifact_path, "cpu", candidate.args_info))
            for record, candidate, result in zip(records, candidates, built, strict=True)
            if result.error_msg is None
        ]
        if not runnable:
            continue
        rounds: list[list[float]] = [[] for _ in runnable]
        for _ in range(_CONFIRM_ROUNDS if len(runnable) > 1 else 0):
            futures = runner.run([runner_input for _, runner_input in runnable])
            for times, future in zip(rounds, futures, strict=True):
                result = future.result()
                ok = result.error_msg is None and result.run_secs
                times.append(_mean(result.run_secs) if ok else _FAILED_S)
        medians = [
            sorted(times)[len(times) // 2] if times else _mean(r.run_secs)
            for (r, _), times in zip(runnable, rounds, strict=True)
        ]
        best = min(range(len(runnable)), key=medians.__getitem__)
        if medians[best] >= _FAILED_S:
            continue
        record = runnable[best][0]
        seconds = rounds[best] or [float(s) for s in record.run_secs]
        tuning.confirmed.commit_tuning_record(
            ms.database.TuningRecord(
                record.trace, tuning.confirmed.commit_workload(mod), seconds, tuning.target, record.args_info
            )
        )
        confirmed[name] = _mean(seconds)
    return confirmed


def _mean(seconds) -> float:
    values = [float(s) for s in seconds]
    return sum(values) / len(values)
