"""The configs the API's entry points take: plain frozen data, validated once, JSON-able.

- :class:`MeasurementConfig`: which operators OQA times and where they are stored (``measure_model``);
- :class:`PlanningConfig`: what the planner is asked for, a budget and the MQE data (``plan_model``, and
  ``compile_model``, which plans only when given one);
- :class:`CalibrationConfig`: how integer layers' ranges are chosen;
- :class:`VerificationConfig`: what is checked on the board after the build;
- :class:`TuningConfig`: MetaSchedule's budget and where its records are kept.

The CLI builds them from its arguments in one place (:mod:`ohq_tvm.cli_configs`). The flat keyword
arguments the entry points took before are still read for one release, with a ``DeprecationWarning``
(:func:`configs_from_keywords`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .budget import BudgetSpec
from .errors import ConfigError
from .plan import CALIBRATION_METHODS
from .precision import Precision
from .samples import AUTO_SYNTHETIC, NORMALIZATIONS, synthetic_choices

SCHEDULES = ("default", "none")


def _path(value: str | os.PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)


def _precisions(value: Sequence[Precision | str] | None) -> tuple[Precision, ...] | None:
    """A non-empty tuple of precisions, or None for "all the board has"."""
    if value is None:
        return None
    precisions = tuple(Precision.parse(str(p)) for p in value)
    if not precisions:
        raise ConfigError(
            "no precisions to measure; give some (e.g. fp32, int8) or none for all the board has"
        )
    return precisions


def _at_least(name: str, value: int | None, low: int, unit: str = "", advice: str = "") -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise ConfigError(f"{name} must be at least {low}{unit}, not {value}{advice}")


def _one_of(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


class _JSONConfig:
    """``to_json``/``from_json`` of a config whose fields are JSON values, paths or precisions."""

    def to_json(self) -> dict:
        data = {}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                value = [p.value for p in value]
            elif isinstance(value, BudgetSpec):
                value = value.text
            data[item.name] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        """The config ``to_json`` wrote; unknown keys raise :class:`ConfigError` naming them."""
        names = {item.name for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no {', '.join(unknown)} (it has {', '.join(sorted(names))})"
            )
        return cls(**data)


@dataclass(frozen=True)
class MeasurementConfig(_JSONConfig):
    """Which candidate operators OQA times on the board, and how.

    ``database``: the measurement database (default ``$OHQ_TVM_DB`` or ``~/.cache/ohq-tvm``);
    ``precisions``: the candidates (default: all the board computes); ``whole_model``: once the parts
    are measured, also time each uniform plan whole (:mod:`ohq_tvm.oqa.in_model`); ``workers``: parallel
    sessions (default: the idle servers under the key); ``schedule``: how operators are built
    (``default`` or ``none``); ``operator_budget``: measure at most this many operators now and predict
    the rest; ``pin_first_last``: keep the first and last layers fp32.
    """

    database: str | None = None
    precisions: tuple[Precision, ...] | None = None
    whole_model: bool = False
    workers: int | None = None
    schedule: str = "default"
    operator_budget: int | None = None
    pin_first_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "database", _path(self.database))
        object.__setattr__(self, "precisions", _precisions(self.precisions))
        _at_least("workers", self.workers, 1)
        _at_least("a budget", self.operator_budget, 1, " operator", "; leave it out to measure all")
        _one_of("schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class PlanningConfig(_JSONConfig):
    """What the planner chooses a plan for (:func:`ohq_tvm.planner.plan_model`).

    ``budget``: a :class:`~ohq_tvm.budget.BudgetSpec` or its text (``"latency=0.8*int8"``; none: the
    least-loss plan); ``database`` and ``precisions``: as for :class:`MeasurementConfig`;
    ``mqe_batches`` synthetic batches of kind ``mqe_data`` for MQE (``auto``: distilled from the model's
    BatchNormalization statistics when it has them, else inverted from a classifier, else Gaussian);
    ``whole_model``: time the uniform plans whole and scale each precision's layers to match;
    ``frontier_points``: a Pareto sweep of at least that many budgets (the budget's ``pareto=N`` when
    larger); ``sensitivity_cache``: a JSON file MQE's estimate is read from when it answers the same
    question, and written to otherwise (none: not kept).
    """

    budget: BudgetSpec | None = None
    database: str | None = None
    precisions: tuple[Precision, ...] | None = None
    mqe_batches: int = 4
    mqe_data: str = AUTO_SYNTHETIC
    whole_model: bool = True
    frontier_points: int = 0
    sensitivity_cache: str | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and not isinstance(self.budget, BudgetSpec):
            object.__setattr__(self, "budget", BudgetSpec.parse(str(self.budget)))
        object.__setattr__(self, "database", _path(self.database))
        object.__setattr__(self, "sensitivity_cache", _path(self.sensitivity_cache))
        object.__setattr__(self, "precisions", _precisions(self.precisions))
        _at_least("mqe_batches", self.mqe_batches, 1)
        _at_least("frontier_points", self.frontier_points, 0)
        _one_of("MQE data", self.mqe_data, synthetic_choices())

    def measurement(self) -> MeasurementConfig:
        """What the planner has measured: every candidate operator, into the same database."""
        return MeasurementConfig(self.database, self.precisions, whole_model=self.whole_model)


@dataclass(frozen=True)
class CalibrationConfig(_JSONConfig):
    """How integer layers' activation ranges are chosen: ``method`` (minmax, percentile, entropy) on
    ``samples`` (a folder of ``.npy`` arrays or images, made tensors per ``normalization``) or, without
    samples, on ``synthetic`` data (gaussian, uniform, matched, distilled, inverted)."""

    method: str = "minmax"
    samples: str | None = None
    normalization: str = "imagenet"
    synthetic: str = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", _path(self.samples))
        _one_of("calibration method", self.method, CALIBRATION_METHODS)
        _one_of("normalization", self.normalization, list(NORMALIZATIONS))
        _one_of("synthetic calibration data", self.synthetic, synthetic_choices())


@dataclass(frozen=True)
class VerificationConfig(_JSONConfig):
    """What is checked after the build: with ``verify``, the module runs on the board and is compared
    with ONNX Runtime; a quantized one's first output is compared with the float32 model's on
    ``fidelity_samples`` synthetic batches and on the images (or ``.npy`` arrays) in ``eval_images``;
    with ``min_agreement``, a top-1 agreement below it (on the images when given) fails verification."""

    verify: bool = True
    fidelity_samples: int = 8
    min_agreement: float | None = None
    eval_images: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_images", _path(self.eval_images))
        _at_least("fidelity_samples", self.fidelity_samples, 0)
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"min_agreement is a fraction from 0 to 1, not {self.min_agreement!r}")


@dataclass(frozen=True)
class TuningConfig(_JSONConfig):
    """MetaSchedule: up to ``trials`` candidates measured on the board (0: no tuning), records kept under
    ``tuning_dir`` (default ``$OHQ_TVM_TUNING_DIR`` or ``~/.cache/ohq-tvm/tuning``)."""

    trials: int = 0
    tuning_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tuning_dir", _path(self.tuning_dir))
        _at_least("trials", self.trials, 0)


def configs_from_keywords(
    caller: str,
    keywords: Mapping[str, Any],
    configs: Mapping[str, Any],
    renamed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``configs`` (argument name -> config) with the flat keyword arguments ``caller`` took before
    folded in: each sets the field of its name (or of its new name in ``renamed``) in the one config
    that has it, and warns (``DeprecationWarning``, naming the config to pass instead); a keyword no
    config has is a ``TypeError`` like Python's own. A field's validation fails as the config's would."""
    result = dict(configs)
    for name, value in keywords.items():
        field = (renamed or {}).get(name, name)
        owners = [
            arg for arg, config in result.items() if field in {f.name for f in dataclasses.fields(config)}
        ]
        if not owners:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        argument = owners[0]
        kind = type(result[argument]).__name__
        warnings.warn(
            f"{caller}({name}=...) is deprecated; pass {argument}={kind}({field}=...) instead",
            DeprecationWarning,
            stacklevel=3,
        )
        result[argument] = dataclasses.replace(result[argument], **{field: value})
    return result


__all__ = [
    "SCHEDULES",
    "CalibrationConfig",
    "MeasurementConfig",
    "PlanningConfig",
    "TuningConfig",
    "VerificationConfig",
    "configs_from_keywords",
]
