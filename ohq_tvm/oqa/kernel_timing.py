"""Time a workload as it runs inside a model: kernel by kernel, with its weights and output out of cache.

Timed alone in a loop, an operator finds its weights and its output buffer in the caches, where its
previous run left them. Inside a model they were last touched an inference ago (the weights) or several
operators ago (the buffer, reused by memory planning); only the input, just written by the previous
operator, is still in cache. Measured on EfficientNet-Lite0 fp32 (2-core host): its fused kernels timed
alone in a loop sum to 21.3 ms, the model spends 23.1 ms in them (the 1x1 convs at 7x7, whose weights
outweigh their activations, the 5 MB classifier, and the 112x112 layers, whose outputs do not fit the L2,
run 10-130% slower there); timed with everything but their input flushed before each run they sum to
23.0 ms. Flushing the input too overshoots (26.7 ms).

So the workload is lowered as the model would be (:func:`~ohq_tvm.codegen.module.lower_for_board`), the
kernels its ``main`` calls are compiled into a plain library, each with the activation it reads (the
most recently written one) moved to the first parameter, and the board times each with TVM's
``cache_flush_cpu_non_first_arg`` before every run (``clflush`` on x86-64, ``dc civac`` on AArch64; on
other CPUs TVM's flush does nothing and the timing is warm, as a plain loop's). The workload's latency
is the sum over its kernel calls; the VM's own work around them (allocations, shape checks: a few µs
per call; 0.16 ms of Lite0's 23 ms) is left out.

Each library also carries the canary of :mod:`.quiet`: with a :class:`~.quiet.QuietGate`, the kernels are
timed only while the board runs at its usual speed, and timed again when it slowed down meanwhile.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from ..board import BoardSession, LatencyStats
from ..errors import OHQError
from ..targets import BoardSpec
from .quiet import CANARY_SYMBOL, QuietGate, QuietWait, canary_function, canary_probe

FLUSH_ALL_BUT_FIRST = "cache_flush_cpu_non_first_arg"
_ESTIMATE_RUNS = 3


@dataclass(frozen=True)
class KernelCall:
    """One call of a TIR kernel by the lowered ``main``: the library symbol timing it, the kernel's name,
    and its parameters as ``(shape, dtype)`` in the symbol's order (the warm activation first)."""

    symbol: str
    kernel: str
    params: tuple[tuple[tuple[int, ...], str], ...]


def kernel_library(lowered: tvm.IRModule) -> tuple[tvm.IRModule, list[KernelCall]]:
    """A TIR module with one function per kernel call of ``lowered["main"]`` (in call order), and the calls.

    ``lowered`` is a module after the build's Relax pipeline. In each function the parameter bound to
    the most recently written activation (``main``'s input, or an output of an earlier call) comes first;
    weights (constants) and outputs follow in their own order. Raises :class:`OHQError` when ``main``
    calls no kernel (nothing to time).
    """
    functions: dict[str, tirx.PrimFunc] = {}
    calls: list[KernelCall] = []
    main = lowered["main"]
    written = {param: 0 for param in main.params}  # activation -> when it was written (0: input)
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.GlobalVar):
                continue
            kernel = lowered[call.op]
            if not isinstance(kernel, tirx.PrimFunc):
                continue
            args = list(call.args)
            warm = _warm_argument(args, written)
            order = [warm, *(i for i in range(len(args)) if i != warm)]
            params = [kernel.params[i] for i in order]
            symbol = f"k{len(calls)}_{call.op.name_hint}"
            function = tirx.PrimFunc(params, kernel.body, kernel.ret_type, kernel.attrs)
            functions[symbol] = function.with_attr("global_symbol", symbol)
            calls.append(
                KernelCall(
                    symbol,
                    call.op.name_hint,
                    tuple((tuple(int(d) for d in p.shape), str(p.dtype)) for p in params),
                )
            )
            for arg in args:  # destination-passing style: the call writes its allocated outputs
                if isinstance(arg, relax.Var) and arg not in written:
                    written[arg] = len(calls)
    if not calls:
        raise OHQError("the workload compiles to no kernel: there is nothing to time")
    return tvm.IRModule(functions), calls


def _warm_argument(args: Sequence[relax.Expr], written: dict[relax.Var, int]) -> int:
    """Index of the activation written last among ``args`` (0 when none is: e.g. only constants)."""
    ready = [(written[a], -i) for i, a in enumerate(args) if isinstance(a, relax.Var) and a in written]
    return -max(ready)[1] if ready else 0


def build_kernel_library(
    lowered: tvm.IRModule, spec: BoardSpec, path: str | os.PathLike, fcompile=None
) -> list[KernelCall]:
    """Compile :func:`kernel_library` of ``lowered`` (and the canary) for ``spec``; export it to ``path``."""
    functions, calls = kernel_library(lowered)
    functions[CANARY_SYMBOL] = canary_function()
    executable = tvm.compile(functions, target=spec.tvm_target())
    executable.export_library(os.fspath(path), fcompile=fcompile)
    return calls


def time_kernels(
    session: BoardSession,
    library_path: str | os.PathLike,
    calls: Sequence[KernelCall],
    *,
    repeat: int,
    min_repeat_ms: float,
    warmup: int = 1,
    seed: int = 0,
    gate: QuietGate | None = None,
    attempts: int = 3,
    on_wait: Callable[[QuietWait], None] | None = None,
) -> tuple[LatencyStats, float | None]:
    """Upload the library, time every call with all but its first argument flushed before each run.

    Each of ``repeat`` repeats is the sum over the calls of one kernel's mean over at least
    ``min_repeat_ms`` of single runs (each run cold, so runs cannot be batched). With a ``gate`` (the
    library built by :func:`build_kernel_library`), timing starts once the board is quiet and is done
    again, up to ``attempts`` times in all, when the canary after it says the board slowed down. Returns
    the latencies and the canary (ms) after the last timing (``None`` without a gate); ``on_wait`` hears
    of the gate's waits (:meth:`QuietGate.wait`). Raises
    :class:`~ohq_tvm.errors.BoardError` when a step on the board fails.
    """
    library = session.load_library(library_path)

    def timing() -> LatencyStats:
        rng = np.random.default_rng(seed)
        totals = np.zeros(repeat)
        for call in calls:
            totals += _time_call(session, library, call, rng, repeat, min_repeat_ms, warmup)
        return LatencyStats(tuple(float(ms) for ms in totals))

    if gate is None or not gate.enabled:
        return timing(), None
    probe = canary_probe(library, session.device, session._guard)
    return gate.time(probe, timing, attempts, on_wait=on_wait)


def _time_call(
    session: BoardSession,
    library: tvm.runtime.Module,
    call: KernelCall,
    rng: np.random.Generator,
    repeat: int,
    min_repeat_ms: float,
    warmup: int,
) -> np.ndarray:
    """``repeat`` means (ms) of cold runs of one kernel call, each mean over >= ``min_repeat_ms``."""
    guard = session._guard
    step = f"timing {call.kernel}"
    arrays = [_synthetic(shape, dtype, rng) for shape, dtype in call.params]
    args = guard("copying inputs", lambda: [tvm.runtime.tensor(x, session.device) for x in arrays])
    kernel = guard(f"loading {call.kernel}", lambda: library[call.symbol])
    for _ in range(warmup):
        guard(f"warming up {call.kernel}", lambda: kernel(*args))

    def mean_ms(runs: int) -> float:
        timer = library.time_evaluator(
            call.symbol, session.device, number=1, repeat=runs, f_preproc=FLUSH_ALL_BUT_FIRST
        )
        return float(np.mean(timer(*args).results)) * 1e3

    runs = _runs_per_repeat(guard(step, lambda: mean_ms(_ESTIMATE_RUNS)), min_repeat_ms)
    # One repeat runs about min_repeat_ms (twice that, for an estimate that came out low).
    expected_s = 2 * min_repeat_ms / 1e3
    return np.array([guard(step, lambda: mean_ms(runs), expected_s) for _ in range(repeat)])


def _runs_per_repeat(estimate_ms: float, min_repeat_ms: float) -> int:
    """Single runs making up one repeat of at least ``min_repeat_ms`` (a kernel counts as >= 1 µs)."""
    return max(1, math.ceil(min_repeat_ms / max(estimate_ms, 1e-3)))


def _synthetic(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Values of the right dtype: small integers, or normal floats (no denormals or NaNs to slow a run)."""
    if "int" in dtype:
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -64), min(info.max, 64), shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


__all__ = ["FLUSH_ALL_BUT_FIRST", "KernelCall", "build_kernel_library", "kernel_library", "time_kernels"]
