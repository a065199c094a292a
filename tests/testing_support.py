"""Helpers the tests share: process leak checks and tiny compiled modules."""

from __future__ import annotations

import psutil
import tvm
from tvm import relax


def tvm_exec_processes() -> set[int]:
    """PIDs of live (non-zombie) `python -m tvm.exec.*` processes on this machine."""
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "tvm.exec." in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(proc.info["pid"])
    return found


def gone(pid: int) -> bool:
    """True when the process no longer runs (a zombie awaiting reaping counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def host_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def build_add_library(path, shape=(4, 4)) -> str:
    """A Relax module returning (x + x, x * x), exported for the host."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([relax.op.add(x, x), relax.op.multiply(x, x)]))
        bb.emit_func_output(out)
    relax.build(bb.get(), host_target()).export_library(str(path))
    return str(path)
