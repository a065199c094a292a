"""How many threads TVM's CPU runtime runs kernels on, on the host and on the boards we start.

Unless ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) says otherwise, TVM's runtime sizes its thread pool
at half the logical CPUs on x86-64, assuming two hyperthreads per core. On a machine without SMT (most
VMs and containers, this project's 2-core CI host included) that is half the cores: every parallel
kernel ran on one of two cores, measured 1.9x slower on MobileNetV2 (int8 and fp32) against ONNX Runtime
on both. The pool is created, per OS thread, on first use and never grows after that, so the count has
to be in the environment before the first parallel kernel runs: for the servers the loopback board
starts (:func:`thread_environment`), and for in-process runs (calibration, distillation, benchmarks) by
:func:`use_host_threads` early on.

Boards joining through a tracker run their own servers: an x86 board without SMT should start
``tvm.exec.rpc_server`` with ``TVM_NUM_THREADS`` set to its core count. What each board's runtime
actually uses is read back over RPC (:func:`remote_threads`) and is part of the board's identity in
the measurement database, so latencies taken with different thread counts are never mixed.
"""

from __future__ import annotations

import os

from ..targets.host import host_cores

THREADS_ENV = "TVM_NUM_THREADS"


def default_threads() -> int:
    """The thread count for kernels on this machine: the user's ``TVM_NUM_THREADS`` (or
    ``OMP_NUM_THREADS``) when set to a positive integer, else the physical cores this process may use
    (:func:`host_cores`)."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return host_cores()


def thread_environment(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with TVM's thread count set to ``threads``."""
    if threads < 1:
        raise ValueError(f"a thread count must be positive, not {threads}")
    env = dict(os.environ if base is None else base)
    env[THREADS_ENV] = str(threads)
    return env


def use_host_threads(threads: int | None = None) -> int:
    """Size TVM's thread pool in this process at ``threads`` (default :func:`default_threads`: a
    ``TVM_NUM_THREADS`` the user set wins over the core count). Takes effect for OS threads whose pool
    does not exist yet (call it before running kernels); returns the count this thread's runtime now
    uses."""
    import tvm

    os.environ[THREADS_ENV] = str(threads or default_threads())
    return int(tvm.get_global_func("runtime.NumThreads")())


def host_vm(executable):
    """A Relax VM on this machine's CPU for ``executable``, after :func:`use_host_threads`."""
    import tvm
    from tvm import relax

    use_host_threads()
    return relax.VirtualMachine(executable, tvm.cpu())


def remote_threads(remote) -> int | None:
    """The thread count of the runtime behind an RPC session (``None`` if it cannot tell)."""
    try:
        return int(remote.get_function("runtime.NumThreads")())
    except (RuntimeError, AttributeError, ValueError):
        return None


__all__ = [
    "THREADS_ENV",
    "default_threads",
    "host_cores",
    "host_vm",
    "remote_threads",
    "thread_environment",
    "use_host_threads",
]
