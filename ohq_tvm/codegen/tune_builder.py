"""How MetaSchedule's candidates are compiled for the board: in worker processes, linked by our toolchain.

MetaSchedule's ``LocalBuilder`` starts fresh worker processes for every batch, and its build function
imports ``tvm.s_tir.tensor_intrin`` (every intrinsic TVM has, CUDA included: 35+ s per worker on two
cores). :class:`CandidateBuilder` keeps one pool for the whole tuning run and builds without that import
(candidates arrive already tensorized). Each candidate is cross-compiled by LLVM for the target and linked
into a shared library by :class:`~ohq_tvm.codegen.toolchain.Toolchain` (native, GNU cross g++ or zig), which
the RPC runner uploads to the board.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .toolchain import Toolchain


def build_candidate(
    toolchain: Toolchain, mod: tvm.IRModule, target: tvm.target.Target, scratch: str | None = None
) -> str:
    """Compile one candidate and link it for the board; return the library's path, in a fresh folder
    under ``scratch`` (the system's temporary folder when None). Runs in a worker process.

    MetaSchedule's RPC runner deletes the board's copy once the candidate is measured, never this one:
    whoever passes ``scratch`` removes it."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    rt_mod = tvm.driver.build(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="ohq-tvm-candidate-", dir=scratch), "candidate.so")
    rt_mod.export_library(path, fcompile=toolchain.fcompile())
    return path


def _warm_up() -> None:
    """Nothing: submitting it starts a worker process, which imports TVM and this module."""


@derived_object
class CandidateBuilder(ms.builder.PyBuilder):
    """A MetaSchedule builder with one persistent pool of ``workers`` processes; :meth:`close` ends it
    and deletes every library it built (one scratch folder for the run: a tuning run builds hundreds).

    A candidate that fails or takes longer than ``timeout_s`` to build comes back as a failed
    ``BuilderResult`` (MetaSchedule records it and moves on); its worker is replaced.
    """

    def __init__(self, toolchain: Toolchain, workers: int = 1, timeout_s: float = 60.0) -> None:
        super().__init__()
        self.toolchain = toolchain
        self.timeout_s = timeout_s
        self.scratch = tempfile.mkdtemp(prefix="ohq-tvm-candidates-")
        self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_s)
        # Start the workers now: each spends seconds importing TVM, meanwhile the search runs here.
        for _ in range(workers):
            self.pool.submit(_warm_up)

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        jobs = [(self.toolchain, item.mod, item.target, self.scratch) for item in build_inputs]
        results = []
        for outcome in self.pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_s} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {outcome.value}"))
        return results

    def close(self) -> None:
        """Stop the worker processes and delete the built libraries (idempotent)."""
        self.pool.shutdown()
        shutil.rmtree(self.scratch, ignore_errors=True)
