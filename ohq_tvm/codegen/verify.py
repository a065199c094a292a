"""Check a compiled module on the board against ONNX Runtime before calling it a success."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..board import BoardSession, LatencyStats
from ..board.session import RemoteVM
from ..errors import VerificationError
from ..frontend import ImportedModel, synthetic_inputs

# fp32 kernels reassociate sums differently from ONNX Runtime; errors this size are rounding, not bugs.
FP32_TOLERANCE = 1e-4
# A quantized module is checked against ONNX Runtime running the plan's QDQ export with its own integer
# kernels. Both requantize with round-half-to-even, but float rounding of ``acc * scale`` can land a value
# on the other side of a tie; one-step differences then propagate. benchmarks/results/quantized.md: 0 on
# the tiny CNN, up to 2.4e-2 on MobileNetV2 (random weights, uniform int8). Beyond this is a real bug.
QUANTIZED_TOLERANCE = 5e-2


@dataclass(frozen=True)
class OutputAgreement:
    """How one output of the board compares with the reference."""

    name: str
    max_abs_error: float
    reference_scale: float  # max |reference|; errors are judged relative to it

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.reference_scale, 1.0)


@dataclass(frozen=True)
class Verification:
    """The outcome of running a module on a board next to the reference."""

    board: str
    seed: int
    tolerance: float
    outputs: tuple[OutputAgreement, ...]
    latency: LatencyStats | None
    reference: str = "onnxruntime"

    @property
    def passed(self) -> bool:
        return all(o.relative_error <= self.tolerance for o in self.outputs)

    def summary(self) -> str:
        worst = max(self.outputs, key=lambda o: o.relative_error)
        verdict = "matches" if self.passed else "DISAGREES with"
        return (
            f"output {verdict} {self.reference_label} (worst relative error {worst.relative_error:.2e} "
            f"on {worst.name!r}, tolerance {self.tolerance:.0e})"
        )

    @property
    def reference_label(self) -> str:
        return {
            "onnxruntime": "ONNX Runtime",
            "onnxruntime-qdq": "ONNX Runtime on the QDQ export",
            "onnxruntime-qdq-unfused": "ONNX Runtime on the QDQ export (unfused)",
        }[self.reference]

    def to_json(self) -> dict:
        return {
            "board": self.board,
            "reference": self.reference,
            "seed": self.seed,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "outputs": [
                {
                    "name": o.name,
                    "max_abs_error": o.max_abs_error,
                    "reference_scale": o.reference_scale,
                    "relative_error": o.relative_error,
                }
                for o in self.outputs
            ],
            "latency": None if self.latency is None else self.latency.to_json(),
        }


def reference_outputs(
    imported: ImportedModel,
    inputs: dict[str, np.ndarray],
    reference: onnx.ModelProto | None = None,
    fused: bool = True,
) -> list[np.ndarray]:
    """Run the (shape-resolved) ONNX model, or ``reference`` (e.g. a QDQ export), in ONNX Runtime."""
    return reference_session(imported, reference, fused)(inputs)


def reference_session(
    imported: ImportedModel, reference: onnx.ModelProto | None = None, fused: bool = True
) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """An ONNX Runtime session on the model (or ``reference``), as a function of the input dict.

    ``fused=False`` turns ONNX Runtime's graph optimisations off: a QDQ export then runs each
    DequantizeLinear → float op → QuantizeLinear as ONNX defines it. Neither form is the integer arithmetic
    exactly on every CPU: fused, ONNX Runtime's own integer kernels on x86 without VNNI add u8·s8 products
    in pairs into saturating int16 (``vpmaddubsw``); unfused, a float32 conv of the dequantized values
    lands a few sums on the other side of a rounding boundary, and the one-step differences add up over
    a deep model's layers.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = reference if reference is not None else imported.onnx_model
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in imported.outputs]
    return lambda inputs: session.run(names, inputs)


def verify_on_board(
    session: BoardSession, library_path: str | os.PathLike, imported: ImportedModel, **options
) -> Verification:
    """Upload and run ``library_path`` on the board with synthetic inputs, compare with ONNX Runtime
    running the imported model (or ``reference``, the QDQ export of a quantized plan). ``options`` are
    :func:`verify_vm`'s.

    Raises :class:`~ohq_tvm.errors.BoardError` if the board fails; a numeric disagreement is not an
    exception here, it is reported by :attr:`Verification.passed`.
    """
    return verify_vm(session.load_vm(library_path), imported, **options)


def verify_vm(
    vm: RemoteVM,
    imported: ImportedModel,
    *,
    seed: int = 0,
    tolerance: float = FP32_TOLERANCE,
    measure_latency: bool = True,
    reference: onnx.ModelProto | None = None,
) -> Verification:
    """:func:`verify_on_board` for a module already loaded on the board: ``seed`` of the synthetic
    inputs, relative ``tolerance``, whether to time it, and the ``reference`` model (default: the
    imported one). A QDQ ``reference`` is run by ONNX Runtime fused and unfused, and the module compared
    with the closer of the two (named in :attr:`Verification.reference`)."""
    inputs = synthetic_inputs(imported.inputs, seed=seed)
    ordered = [inputs[spec.name] for spec in imported.inputs]
    got = vm.run(ordered)
    if reference is None:
        candidates = {"onnxruntime": reference_outputs(imported, inputs)}
    else:  # ONNX Runtime runs a QDQ export two ways, each inexact on some CPUs (see reference_session)
        candidates = {
            "onnxruntime-qdq": reference_outputs(imported, inputs, reference),
            "onnxruntime-qdq-unfused": reference_outputs(imported, inputs, reference, fused=False),
        }
    compared = {
        label: _agreements(vm.name, imported, got, expected) for label, expected in candidates.items()
    }
    label = min(compared, key=lambda name: max(o.relative_error for o in compared[name]))
    latency = vm.time(ordered) if measure_latency else None
    return Verification(vm.session.label, seed, tolerance, compared[label], latency, label)


def _agreements(
    name: str, imported: ImportedModel, got: list[np.ndarray], expected: list[np.ndarray]
) -> tuple[OutputAgreement, ...]:
    if len(got) != len(expected):
        raise VerificationError(f"{name}: module returned {len(got)} outputs, the ONNX model {len(expected)}")
    return tuple(
        OutputAgreement(
            name=spec.name,
            max_abs_error=float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)), initial=0.0)),
            reference_scale=float(np.max(np.abs(e), initial=0.0)),
        )
        for spec, g, e in zip(imported.outputs, got, expected, strict=True)
    )
