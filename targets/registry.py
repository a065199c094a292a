"""Read board descriptions: built-in TOMLs, a user's TOML, a TVM target JSON string, or a raw triple."""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ohq_tvm.errors import TargetError
from ohq_tvm.precision import Precision

from . import host as host_facts
from .host import host_cores

_TRIPLE = re.compile(r"^[a-z0-9_]+(-[a-z0-9_.]+){1,3}$")
_ACCEPTED_FORMS = "a board name, a board TOML path, a target triple (aarch64-linux-gnu) or TVM target JSON"

# The CPU models of Debian 12's qemu-aarch64 that an emulated board may use. Not "max": it turns on every
# extension qemu knows (SVE, i8mm, ...), so code the real board cannot run would run there.
EMULATED_CPUS = ("a64fx", "cortex-a35", "cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1")


@dataclass(frozen=True)
class BoardSpec:
    """A board: how TVM should compile for it, how to reach it, and what it computes natively."""

    name: str
    description: str
    target_config: dict[str, Any]
    rpc_key: str
    cross_triple: str | None
    num_cores: int
    precisions: tuple[Precision, ...]
    dot_product: str | None
    source: str
    emulated_cpu: str | None = None  # qemu's model of the board's core, for an emulated board

    @property
    def arch(self) -> str:
        """The board's architecture (``aarch64``, ``x86_64``, ...), from its triple or this machine's."""
        triple = self.target_config.get("mtriple")
        return host_facts.arch_of(str(triple)) if triple else host_facts.machine_arch()

    def tvm_target(self):  # -> tvm.target.Target (TVM imported lazily: listing boards needs no TVM)
        """The TVM target; :class:`TargetError` carrying TVM's message when TVM rejects it."""
        import tvm

        try:
            return tvm.target.Target(dict(self.target_config))
        except Exception as err:  # TVM raises builtin types with its own message
            raise TargetError(f"board {self.name} ({self.source}): TVM rejects its target: {err}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "target": dict(self.target_config),
            "rpc_key": self.rpc_key,
            "cross_triple": self.cross_triple,
            "num_cores": self.num_cores,
            "precisions": [p.value for p in self.precisions],
            "dot_product": self.dot_product,
            "source": self.source,
            "emulated_cpu": self.emulated_cpu,
        }


def _cross_triple(config: dict[str, Any], explicit: str | None) -> str | None:
    if explicit:
        return explicit
    triple = config.get("mtriple")
    if not triple:
        return None
    return None if host_facts.arch_of(str(triple)) == host_facts.machine_arch() else str(triple)


def _precisions(values: Any, where: str) -> tuple[Precision, ...]:
    if not isinstance(values, list) or not values:
        raise TargetError(f'{where}: \'precisions\' must be a non-empty list such as ["fp32", "int8"]')
    try:
        parsed = [Precision.parse(str(v)) for v in values]
    except Exception as err:
        raise TargetError(f"{where}: {err}") from None
    # fp32 is always available and always first: it is the reference every other precision is judged by.
    rest = [p for p in dict.fromkeys(parsed) if p is not Precision.FP32]
    return (Precision.FP32, *rest)


def _emulated_cpu(config: dict[str, Any], explicit: Any, source: str) -> str | None:
    """qemu's CPU model for the board: the TOML's ``emulated_cpu``, else its ``mcpu`` when qemu models
    that core; ``None`` for boards that are not aarch64 or whose core qemu does not know."""
    triple = config.get("mtriple")
    arch = host_facts.arch_of(str(triple)) if triple else host_facts.machine_arch()
    if explicit is None:
        mcpu = config.get("mcpu")
        return str(mcpu) if arch == "aarch64" and mcpu in EMULATED_CPUS else None
    if arch != "aarch64":
        raise TargetError(f"{source}: 'emulated_cpu' is for aarch64 boards; this one is {arch}")
    if explicit not in EMULATED_CPUS:
        raise TargetError(
            f"{source}: 'emulated_cpu' must be one of qemu's aarch64 cores ({', '.join(EMULATED_CPUS)}), "
            f"not {explicit!r}"
            + (
                " (max enables every extension and hides code the board cannot run)"
                if explicit == "max"
                else ""
            )
        )
    return str(explicit)


def board_from_mapping(data: dict[str, Any], source: str) -> BoardSpec:
    """Build a :class:`BoardSpec` from parsed TOML; errors name ``source`` and the offending key. Only
    CPU targets (kind ``llvm``) are accepted: the pipeline's schedules, export and RPC runs are for CPUs."""
    target = data.get("target")
    if not isinstance(target, dict) or "kind" not in target:
        raise TargetError(f'{source}: needs a [target] table with at least kind = "llvm"')
    if target["kind"] != "llvm":
        raise TargetError(
            f"{source}: target kind {target['kind']!r} is not supported: ohq-tvm builds for CPU boards, "
            'whose modules it runs and measures over RPC, so the kind must be "llvm" (with the board\'s '
            "mtriple, mcpu and mattr)"
        )
    config = dict(target)
    if config.get("mcpu") == "auto":
        config["mcpu"] = host_facts.system_cpu()
    name = data.get("name") or Path(source).stem
    cores = data.get("num_cores", config.get("num-cores", 1))
    if cores == "auto":
        cores = host_cores()
    if not isinstance(cores, int) or cores < 1:
        raise TargetError(f"{source}: 'num_cores' must be a positive integer or \"auto\"")
    precisions = _precisions(data.get("precisions", ["fp32", "int8", "int4w"]), source)
    dot_product = data.get("dot_product")
    if dot_product == "auto":
        dot_product = host_facts.dot_product()
        if host_facts.has_native_fp16() and Precision.FP16 not in precisions:
            precisions = (*precisions, Precision.FP16)
    if dot_product not in (None, "vnni", "sdot"):
        raise TargetError(f'{source}: \'dot_product\' must be "vnni", "sdot" or absent, not {dot_product!r}')
    return BoardSpec(
        emulated_cpu=_emulated_cpu(config, data.get("emulated_cpu"), source),
        name=str(name),
        description=str(data.get("description", "")),
        target_config=config,
        rpc_key=str(data.get("rpc_key", name)),
        cross_triple=_cross_triple(config, data.get("cross_triple")),
        num_cores=cores,
        precisions=precisions,
        dot_product=dot_product,
        source=source,
    )


def _builtin_files() -> dict[str, Any]:
    folder = resources.files("ohq_tvm.targets")
    return {entry.name[: -len(".toml")]: entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def builtin_board_names() -> list[str]:
    return sorted(_builtin_files())


def list_boards() -> list[BoardSpec]:
    """The built-in boards, sorted by name."""
    return [_load_builtin(name) for name in builtin_board_names()]


def _load_builtin(name: str) -> BoardSpec:
    entry = _builtin_files()[name]
    return board_from_mapping(tomllib.loads(entry.read_text()), f"builtin:{name}")


def load_board_file(path: str | os.PathLike) -> BoardSpec:
    """A user's board TOML (same schema as the built-ins)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as err:
        raise TargetError(f"{path}: not valid TOML: {err}") from None
    return board_from_mapping(data, str(path))


def _from_json(text: str) -> BoardSpec:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise TargetError(f"target JSON is malformed: {err}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise TargetError('target JSON needs a "kind", e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')
    return board_from_mapping({"name": "custom", "target": config}, "json")


def _from_triple(triple: str) -> BoardSpec:
    config: dict[str, Any] = {"kind": "llvm", "mtriple": triple}
    if host_facts.arch_of(triple) == "aarch64":
        config["mattr"] = ["+neon"]
    return board_from_mapping({"name": triple, "target": config}, f"triple:{triple}")


def resolve_target(spec: str | BoardSpec) -> BoardSpec:
    """Resolve what a user typed after ``--target`` (a :class:`BoardSpec` is returned as it is: the one
    place where the API's entry points turn their ``target`` into a board description).

    Tried in order: built-in board name, path to a board TOML, TVM target JSON, raw target triple.
    Raises :class:`TargetError` listing the built-in boards when nothing matches.
    """
    if isinstance(spec, BoardSpec):
        return spec
    text = spec.strip()
    if text in _builtin_files():
        return _load_builtin(text)
    if text.endswith(".toml") or os.path.sep in text:
        if not Path(text).is_file():
            raise TargetError(f"board file {text} does not exist")
        return load_board_file(text)
    if text.startswith("{"):
        return _from_json(text)
    if _TRIPLE.match(text) and host_facts.arch_of(text) in host_facts.KNOWN_ARCHES:
        return _from_triple(text)
    raise TargetError(
        f"unknown target {spec!r}; known boards: {', '.join(builtin_board_names())} "
        f"(or give {_ACCEPTED_FORMS})"
    )
