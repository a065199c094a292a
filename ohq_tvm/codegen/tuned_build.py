"""Build with tuning records: MetaSchedule's best schedule where the database has one, our default elsewhere.

The pipeline is :func:`~ohq_tvm.codegen.schedules.cpu_pipeline` with ``MetaScheduleApplyDatabase`` run between
fusion and :func:`~ohq_tvm.codegen.schedules.default_cpu_schedule`: a fused TIR function with a valid record
gets the record's schedule (and is marked scheduled), every other one gets the zero-budget schedule, so
no function is left naive. Task extraction (:mod:`ohq_tvm.codegen.tune`) runs the same passes up to fusion,
so the functions it tunes are exactly the ones this pipeline looks up.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.target import Target

from .schedules import default_cpu_schedule, fusion_passes, lowering_passes
from .tuning_database import TuningDatabase, register_cpu_intrinsics


def schedule_passes(target: Target) -> list[tvm.transform.Pass]:
    """:func:`fusion_passes`, then the database's schedules, then the default schedule for the rest.

    Create and run them inside ``with target:`` and ``with database:`` (``MetaScheduleApplyDatabase``
    reads the target when created and the current database when run).
    """
    return [*fusion_passes(target), relax.transform.MetaScheduleApplyDatabase(), default_cpu_schedule()]


def fuse(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """``mod`` after :func:`fusion_passes`: Relax calling one unscheduled PrimFunc per fused group."""
    with target:
        return tvm.transform.Sequential(fusion_passes(target))(mod)


def tuned_cpu_pipeline(tuning: TuningDatabase) -> tvm.transform.Pass:
    """Relax's CPU pipeline with :func:`schedule_passes` in place of fusion and default scheduling."""
    target = tuning.target

    @tvm.transform.module_pass(opt_level=0, name="OHQTunedCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target, tuning.for_build:
            seq = tvm.transform.Sequential([*schedule_passes(target), *lowering_passes(target)])
            return seq(mod)

    return _pipeline


def build_tuned(mod: tvm.IRModule, tuning: TuningDatabase) -> relax.Executable:
    """``relax.build`` for ``tuning.target`` with :func:`tuned_cpu_pipeline`.

    Raises whatever TVM raises (:func:`~ohq_tvm.codegen.module.build_executable` turns it into a
    :class:`~ohq_tvm.errors.BuildError`).
    """
    register_cpu_intrinsics()  # records may replay tensorized schedules (VNNI, dot-product)
    return relax.build(mod, tuning.target, relax_pipeline=tuned_cpu_pipeline(tuning))


def scheduled_module(mod: tvm.IRModule, tuning: TuningDatabase) -> tvm.IRModule:
    """``mod`` fused and scheduled as :func:`build_tuned` schedules it (before lowering), for inspection."""
    register_cpu_intrinsics()
    with tuning.target, tuning.for_build:
        return tvm.transform.Sequential(schedule_passes(tuning.target))(mod)
