"""Distilled synthetic data: inputs optimised until every BatchNormalization sees its training statistics.

Gaussian noise is not what a CNN was trained on: deep in the network its activations shrink to a fraction
of their trained spread, and a layer's quantization error, scored on them, ranks layers differently from
real data (the ZeroQ observation). A BatchNormalization's running mean and variance are the statistics
of its input on the training set, so after folding (``ohq_tvm.onnx_fold``) the conv feeding it should
produce, per channel, mean ``beta`` and standard deviation ``|gamma|``. Starting from Gaussian noise,
each image is moved by Adam along the gradient of

    sum over BN layers of (||mean_c - beta||^2 + ||std_c - |gamma| ||^2) / sum(gamma^2)

(statistics over the image's pixels, per channel), computed by Relax's automatic differentiation of the
imported float32 model, compiled once with the default CPU schedule and run on this machine: the data is
the same whatever the board, so it is made where the compiler runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

from .board.threads import host_vm
from .codegen.module import build_executable
from .errors import OHQError
from .frontend import ImportedModel
from .onnx_fold import graph_constants
from .passes.layer_id import LAYERS_ATTR, layer_bindings, layer_id_of
from .targets import resolve_target

ITERATIONS = 200
LEARNING_RATE = 0.1
_ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class ChannelTarget:
    """What a folded conv's output should look like per channel: ``mean[C]`` and ``std[C]``."""

    layer_id: str
    mean: np.ndarray
    std: np.ndarray


def _bn_after_convs(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ONNX Conv node name → (BN shift, |BN scale|) of the BatchNormalization reading its output."""
    graph = model.graph
    constants = graph_constants(graph, identities=True)
    producers = {out: node for node in graph.node for out in node.output}
    found = {}
    for node in graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) != 5:
            continue
        conv = producers.get(node.input[0])
        if conv is None or conv.op_type != "Conv":
            continue
        if not all(name in constants for name in node.input[1:3]):
            continue
        scale, shift = (constants[name].astype(np.float32) for name in node.input[1:3])
        found[conv.name] = (shift, np.abs(scale))
    return found


def _normalised_outputs(func: relax.Function) -> dict[str, relax.Var]:
    """Layer id → the variable holding that layer's BatchNormalization output: ``add(conv, bias)`` where
    the import folded the BN into the conv, ``batch_norm(conv, ...)[0]`` where it could not (parameters
    shared between BNs)."""
    layer_vars = {b.var: layer_id_of(b.var) for b in layer_bindings(func)}
    norms: dict[relax.Var, str] = {}
    outputs: dict[str, relax.Var] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.index == 0 and value.tuple_value in norms:
                outputs[norms[value.tuple_value]] = binding.var
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
                continue
            if not value.args or value.args[0] not in layer_vars:
                continue
            if value.op.name == "relax.add":
                outputs.setdefault(layer_vars[value.args[0]], binding.var)
            elif value.op.name == "relax.nn.batch_norm":
                norms[binding.var] = layer_vars[value.args[0]]
    return outputs


def channel_targets(imported: ImportedModel) -> list[ChannelTarget]:
    """The per-channel output statistics of every layer whose conv fed a BatchNormalization in the ONNX
    file (empty when the file has none: BN already folded by the exporter, or a model without BN)."""
    bn = _bn_after_convs(imported.onnx_model)
    func = imported.mod["main"]
    names = func.attrs.get(LAYERS_ATTR, {})
    outputs = _normalised_outputs(func)
    targets = []
    for binding in layer_bindings(func):
        layer_id = layer_id_of(binding.var)
        onnx_name = str(names.get(layer_id, "")) if layer_id else ""
        if onnx_name in bn and layer_id in outputs:
            mean, std = bn[onnx_name]
            targets.append(ChannelTarget(layer_id, mean, std))
    return targets


@relax.expr_functor.mutator
class _ClipAsMinMax(relax.PyExprMutator):
    """``clip(x, lo, hi)`` as ``minimum(maximum(x, lo), hi)``: Relax differentiates those, not clip."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip":
            data, low, high = call.args
            dtype = data.ty.dtype
            lower = relax.op.maximum(data, relax.const(float(low.value), dtype))
            return relax.op.minimum(lower, relax.const(float(high.value), dtype))
        return call


def _statistics_term(bb: relax.BlockBuilder, output: relax.Var, target: ChannelTarget) -> relax.Var:
    """Emit one layer's normalised squared distance from its target statistics (a scalar)."""
    axes = [0, 2, 3]
    mean = bb.emit(relax.op.mean(output, axis=axes))
    std = bb.emit(relax.op.sqrt(relax.op.add(relax.op.variance(output, axis=axes), relax.const(1e-5))))
    off_mean = bb.emit(relax.op.subtract(mean, relax.const(target.mean)))
    off_std = bb.emit(relax.op.subtract(std, relax.const(target.std)))
    squares = relax.op.add(
        relax.op.sum(relax.op.multiply(off_mean, off_mean)), relax.op.sum(relax.op.multiply(off_std, off_std))
    )
    scale = float(np.sum(target.std.astype(np.float64) ** 2)) or 1.0
    return bb.emit(relax.op.divide(squares, relax.const(scale)))


def statistics_loss_module(imported: ImportedModel, targets: Sequence[ChannelTarget]) -> tvm.IRModule:
    """``main(x) -> loss`` (the model's bindings up to its last targeted layer, then the loss) and its
    gradient ``main_adjoint(x) -> (loss, (dloss/dx,))``.

    Raises :class:`OHQError` when the model has not exactly one 4-D float input, when ``targets`` is
    empty, or when an operator before the last BatchNormalization has no gradient in Relax.
    """
    func = imported.mod["main"]
    if len(func.params) != 1 or len(imported.inputs[0].shape) != 4 or imported.inputs[0].dtype != "float32":
        raise OHQError("distilled data needs a model with one float32 NCHW input")
    by_layer = {t.layer_id: t for t in targets}
    if not by_layer:
        raise OHQError("distilled data needs BatchNormalization statistics, and the model has none")
    outputs = {var: layer_id for layer_id, var in _normalised_outputs(func).items() if layer_id in by_layer}
    if len(outputs) != len(by_layer):
        missing = sorted(set(by_layer) - set(outputs.values()))
        raise OHQError(f"no BatchNormalization output found for layer(s) {', '.join(missing)}")
    bindings = [b for block in func.body.blocks for b in block.bindings]
    bb = relax.BlockBuilder()
    terms: list[relax.Var] = []
    with bb.function("main", list(func.params)):
        with bb.dataflow():
            for binding in bindings:
                bb.emit_normalized(binding)
                if binding.var in outputs:
                    terms.append(_statistics_term(bb, binding.var, by_layer[outputs[binding.var]]))
                if len(terms) == len(outputs):
                    break  # nothing after the last BN matters to the loss
            loss = terms[0]
            for term in terms[1:]:
                loss = bb.emit(relax.op.add(loss, term))
            output = bb.emit_output(loss)
        bb.emit_func_output(output)
    return with_input_gradient(
        bb.get(), "distilled data needs the gradient of every operator before the last BatchNormalization"
    )


def with_input_gradient(mod: tvm.IRModule, requirement: str) -> tvm.IRModule:
    """``mod``, whose ``main`` returns a scalar loss of its first parameter, with ``main_adjoint``
    returning ``(loss, (dloss/dinput,))`` from Relax's automatic differentiation. Clips become
    min/max and BatchNormalizations arithmetic first (Relax differentiates neither). Raises
    :class:`OHQError` starting with ``requirement`` when an operator has no gradient."""
    mod = tvm.IRModule({"main": _ClipAsMinMax().visit_expr(mod["main"])})
    mod = relax.transform.DecomposeOpsForInference()(relax.transform.Normalize()(mod))
    try:
        return relax.transform.Gradient("main", require_grads=[mod["main"].params[0]])(mod)
    except Exception as err:  # TVM raises builtin types for an operator without a gradient
        lines = str(err).strip().splitlines()
        reason = lines[-1] if lines else type(err).__name__
        raise OHQError(f"{requirement}: {reason}; use gaussian synthetic data instead") from err


def host_functions(mod: tvm.IRModule):
    """``mod`` built for this machine (the default CPU schedule), as a VM whose functions take tensors."""
    return host_vm(build_executable(mod, resolve_target("host")))


def distillable(imported: ImportedModel) -> bool:
    """Whether :func:`distilled_batches` can make data for ``imported``: BatchNormalization statistics,
    one float32 NCHW input, and a gradient for every operator before the last BN."""
    try:
        statistics_loss_module(imported, channel_targets(imported))
    except OHQError:
        return False
    return True


def distilled_batches(
    imported: ImportedModel,
    count: int,
    *,
    iterations: int = ITERATIONS,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``count`` inputs distilled from the model's BatchNormalization statistics (module docstring).

    Each starts as standard-normal noise (``seed``) and takes ``iterations`` Adam steps of size
    ``learning_rate`` (decaying along a cosine). ``progress(done, total)`` is called after each step.
    Raises :class:`OHQError` as :func:`statistics_loss_module` does.
    """
    step = host_functions(statistics_loss_module(imported, channel_targets(imported)))["main_adjoint"]

    def gradient(_index: int, image: np.ndarray) -> np.ndarray:
        _loss, (grad,) = step(tvm.runtime.tensor(image))
        return grad.numpy()

    return optimised_inputs(imported, count, gradient, iterations, learning_rate, seed, progress)


def optimised_inputs(
    imported: ImportedModel,
    count: int,
    gradient: Callable[[int, np.ndarray], np.ndarray],
    iterations: int,
    learning_rate: float,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``count`` batches for the model's single input, each starting as standard-normal noise
    (``seed``) and moved by ``iterations`` Adam steps along ``gradient(i, input_i)``, the step size
    decaying from ``learning_rate`` along a cosine; ``progress(done, total)`` after each step
    (``total`` = count x iterations)."""
    (spec,) = imported.inputs
    images = np.random.default_rng(seed).standard_normal((count, *spec.shape)).astype(np.float32)
    beta1, beta2 = _ADAM_BETAS
    total = count * iterations
    for index in range(count):
        first, second = np.zeros_like(images[index]), np.zeros_like(images[index])
        for it in range(iterations):
            grad = gradient(index, images[index])
            first = beta1 * first + (1 - beta1) * grad
            second = beta2 * second + (1 - beta2) * grad * grad
            corrected = first / (1 - beta1 ** (it + 1))
            spread = np.sqrt(second / (1 - beta2 ** (it + 1))) + 1e-8
            rate = learning_rate * 0.5 * (1 + np.cos(np.pi * it / iterations))
            images[index] -= rate * corrected / spread
            if progress is not None:
                progress(index * iterations + it + 1, total)
    return [{spec.name: images[i]} for i in range(count)]


def statistics_loss(imported: ImportedModel, batch: Mapping[str, np.ndarray]) -> float:
    """The distillation loss of one input (for checks: distilled data should score far below noise)."""
    vm = host_functions(statistics_loss_module(imported, channel_targets(imported)))
    (spec,) = imported.inputs
    return float(vm["main"](tvm.runtime.tensor(np.asarray(batch[spec.name], np.float32))).numpy())


__all__ = [
    "ChannelTarget",
    "channel_targets",
    "distillable",
    "distilled_batches",
    "host_functions",
    "optimised_inputs",
    "statistics_loss",
    "statistics_loss_module",
    "with_input_gradient",
]
