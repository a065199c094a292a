"""The budget a user gives ``ohq-tvm compile --budget``: parsed once, validated, resolved against the
baselines' predicted numbers by the planner.

Grammar (terms separated by commas)::

    latency=5ms | latency=0.8*int8 | latency=int8 | latency=0.6*fp32
    size=2MB | size=512KB | size=0.5*fp32
    memory=512KB | memory=0.5*fp32
    pareto | pareto=N

``size`` bounds the plan's weight bytes; ``memory`` its peak per-layer working set (the largest, over
layers, of weights + input + output at the layer's precision). A relative term is a factor times a
reference plan: ``fp32`` or a uniform plan of one precision (``int8``, ``fp16``, ``int4w``): its latency
as timed whole on the board (predicted from its parts when it was not timed whole), its weight size or
peak memory as the planner predicts them. ``pareto``
sweeps the latency/loss frontier (``N`` points, default 12); alone, it builds the frontier's knee (the
point farthest below the line from the fastest to the most accurate plan).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import BudgetError
from .precision import Precision

DEFAULT_PARETO_POINTS = 12
_UNITS_BYTES = {"b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024.0, "mib": 1024.0**2}
_UNITS_MS = {"ms": 1.0, "s": 1e3, "us": 1e-3}
# Terms that bound a quantity: their units and the unit a bare number means (None: one must be given).
_LIMIT_UNITS = {"latency": (_UNITS_MS, "ms"), "size": (_UNITS_BYTES, None), "memory": (_UNITS_BYTES, None)}
_GRAMMAR = (
    "latency=5ms, latency=0.8*int8, size=2MB, size=0.5*fp32, memory=512KB, memory=0.5*fp32, "
    "pareto or pareto=N (comma-separated)"
)


@dataclass(frozen=True)
class Limit:
    """``value`` in the quantity's unit (ms, bytes), or ``factor`` × the ``reference`` plan's number."""

    value: float | None = None
    factor: float | None = None
    reference: str | None = None

    def resolve(self, quantity: str, references: Mapping[str, Mapping[str, float]]) -> float:
        """The limit in the quantity's unit; ``references`` maps plan names to predicted numbers."""
        if self.value is not None:
            return self.value
        if self.reference not in references:
            known = ", ".join(sorted(references))
            raise BudgetError(
                f"budget {quantity}={self.factor:g}*{self.reference}: the board has no {self.reference} "
                f"plan to measure against (reference plans here: {known})"
            )
        return float(self.factor) * float(references[self.reference][quantity])

    def describe(self, unit: str) -> str:
        if self.value is not None:
            return f"{self.value:g} {unit}"
        return f"{self.factor:g} × {self.reference}"


@dataclass(frozen=True)
class Budgets:
    """Upper bounds in the quantities' units (what the solver reads); ``None`` leaves a quantity free."""

    latency_ms: float | None = None
    size_bytes: float | None = None
    memory_bytes: float | None = None  # each layer's working set, hence the plan's peak
    bops: float | None = None
    sensitivity: float | None = None


@dataclass(frozen=True)
class BudgetSpec:
    """What the chosen plan must meet; empty means "least loss", i.e. the most accurate plan."""

    latency: Limit | None = None
    size: Limit | None = None
    memory: Limit | None = None
    pareto_points: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> BudgetSpec:
        """Read ``text`` (see the module docstring); raises :class:`BudgetError` naming the bad term."""
        limits: dict[str, Limit] = {}
        points = 0
        terms = [t.strip() for t in str(text).split(",") if t.strip()]
        if not terms:
            raise BudgetError(f"empty budget; examples: {_GRAMMAR}")
        for term in terms:
            name, _, value = (part.strip() for part in term.partition("="))
            name = name.lower()
            if name == "pareto":
                points = _parse_points(term, value)
            elif name in _LIMIT_UNITS:
                if name in limits:
                    raise BudgetError(f"budget {text!r} sets {name} twice")
                units, default_unit = _LIMIT_UNITS[name]
                limits[name] = _parse_limit(term, value, units, default_unit=default_unit)
            else:
                raise BudgetError(f"unknown budget term {term!r}; examples: {_GRAMMAR}")
        return cls(**limits, pareto_points=points, text=",".join(terms))

    @property
    def knee(self) -> bool:
        """Only a frontier was asked for: the plan to build is its knee."""
        return self.pareto_points > 0 and self.latency is None and self.size is None and self.memory is None

    def resolve(self, references: Mapping[str, Mapping[str, float]]) -> Budgets:
        """The limits in ms and bytes: a relative term times its reference plan's number in ``references``
        (plan name -> ``latency_ms``, ``size_bytes``, ``memory_bytes``, as :func:`~ohq_tvm.planner.
        reference_numbers` gives them). Raises :class:`BudgetError` for a reference plan not there."""
        quantities = {"latency": "latency_ms", "size": "size_bytes", "memory": "memory_bytes"}
        return Budgets(
            **{
                quantity: limit.resolve(quantity, references)
                for name, quantity in quantities.items()
                if (limit := getattr(self, name)) is not None
            }
        )

    def references(self) -> set[str]:
        limits = (self.latency, self.size, self.memory)
        return {limit.reference for limit in limits if limit and limit.reference}

    def __str__(self) -> str:
        return self.text or "none (least loss)"


def _parse_points(term: str, value: str) -> int:
    if not value:
        return DEFAULT_PARETO_POINTS
    if not value.isdigit() or int(value) < 2:
        raise BudgetError(f"budget term {term!r}: pareto=N needs a whole number of points >= 2")
    return int(value)


_RELATIVE = re.compile(r"^(?:(?P<factor>[0-9.]+(?:e-?\d+)?)\s*[*x×]\s*)?(?P<reference>[a-z][a-z0-9]*)$")
_ABSOLUTE = re.compile(r"^(?P<number>[0-9.]+(?:e-?\d+)?)\s*(?P<unit>[a-z]*)$")


def _parse_limit(term: str, value: str, units: Mapping[str, float], default_unit: str | None) -> Limit:
    text = value.strip().lower()
    absolute = _ABSOLUTE.match(text)
    if absolute:
        unit = absolute["unit"] or default_unit
        if unit not in units:
            wanted = ", ".join(units)
            raise BudgetError(f"budget term {term!r}: give a unit ({wanted}) or factor*plan, e.g. 0.8*int8")
        number = _number(term, absolute["number"])
        return Limit(value=number * units[unit])
    relative = _RELATIVE.match(text)
    if relative:
        reference = relative["reference"]
        if reference != Precision.FP32.value and reference not in {p.value for p in Precision}:
            known = ", ".join(p.value for p in Precision)
            raise BudgetError(f"budget term {term!r}: {reference!r} is not a plan to compare with ({known})")
        factor = _number(term, relative["factor"]) if relative["factor"] else 1.0
        return Limit(factor=factor, reference=reference)
    raise BudgetError(f"cannot read budget term {term!r}; examples: {_GRAMMAR}")


def _number(term: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise BudgetError(f"budget term {term!r}: {text!r} is not a number") from None
    if not number > 0:
        raise BudgetError(f"budget term {term!r}: the limit must be positive")
    return number


__all__ = ["DEFAULT_PARETO_POINTS", "BudgetError", "BudgetSpec", "Budgets", "Limit"]
