"""Facts about the machine we run on, for the ``host`` board and for telling native from cross builds."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "arm", "armv7": "arm", "armhf": "arm"}
_CPU_TOPOLOGY = Path("/sys/devices/system/cpu")
KNOWN_ARCHES = {"x86_64", "aarch64", "arm", "i686", "riscv64"}


def arch_of(triple_or_machine: str) -> str:
    """Normalised architecture of a triple (``aarch64-linux-gnu`` → ``aarch64``) or machine name."""
    arch = triple_or_machine.split("-", 1)[0].lower()
    return _ARCH_ALIASES.get(arch, arch)


def machine_arch() -> str:
    return arch_of(platform.machine())


@functools.cache
def system_cpu() -> str:
    """LLVM's name for this CPU (e.g. ``znver5``, ``skylake-avx512``)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The kernel's CPU feature flags (empty where /proc/cpuinfo has none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            return frozenset(value.split())
    return frozenset()


def dot_product() -> str | None:
    """``"vnni"`` on x86 with AVX-512 VNNI or AVX-VNNI, ``"sdot"`` on ARM with asimddp, else None."""
    flags = cpu_flags()
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    if "asimddp" in flags:
        return "sdot"
    return None


def has_native_fp16() -> bool:
    """fp16 arithmetic in hardware: AVX512-FP16 on x86, FEAT_FP16 (``asimdhp``) on ARM."""
    return bool(cpu_flags() & {"avx512_fp16", "asimdhp"})


def host_cores() -> int:
    """Physical cores this process may run on: logical CPUs in its affinity mask, counting SMT siblings
    (CPUs sharing a ``core_id`` in one package, per Linux's sysfs topology) once. Where the topology is
    not readable (not Linux), the logical CPU count."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = _CPU_TOPOLOGY / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return max(1, len(cores))
