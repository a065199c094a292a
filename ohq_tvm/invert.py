"""Class-inverted synthetic data, for classifiers without BatchNormalization statistics to distil from.

On Gaussian noise a trained classifier is unsure (MNIST CNN: median top-1 probability 0.26), while on
its real inputs it is nearly certain (0.99999999): the two regimes stress different layers, and a layer
ranking scored on noise can come out reversed. Inverting the model instead gives inputs it treats like
its training data: each input, starting from Gaussian noise, is moved by Adam along the gradient of

    cross-entropy(softmax(model(x)), class k)  +  TV_WEIGHT * TV(x)  +  L2_WEIGHT * mean(x^2)

with the classes taken in turn (input ``i`` of ``count``, row ``r`` of its batch: class
``(i * batch + r) mod K``), so every class is represented. ``TV`` is the mean squared difference of
neighbouring pixels (an image prior: natural inputs are smooth, adversarial noise is not); it applies to
NCHW inputs only. The gradient comes from Relax's automatic differentiation of the imported model,
compiled once for this machine (the data does not depend on the board).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tvm
from tvm import relax

from .distill import ITERATIONS, LEARNING_RATE, host_functions, optimised_inputs, with_input_gradient
from .errors import OHQError
from .frontend import ImportedModel

TV_WEIGHT = 1.0
L2_WEIGHT = 0.01


def class_count(imported: ImportedModel) -> int:
    """K, the classes of a model whose single output is float32 ``[batch, K]`` with K >= 2.

    Raises :class:`OHQError` for any other model (several inputs or outputs, a non-float input, an
    output that is not a 2-D score per class)."""
    func = imported.mod["main"]
    if len(func.params) != 1 or imported.inputs[0].dtype != "float32":
        raise OHQError("inverted data needs a model with one float32 input")
    output = func.body.body.ty
    if not isinstance(output, relax.TensorType) or output.ndim != 2 or output.dtype != "float32":
        raise OHQError("inverted data needs a classifier: one float32 output of shape [batch, classes]")
    shape = output.shape
    classes = shape[1] if shape is not None else None
    if not isinstance(classes, tvm.tirx.IntImm) or int(classes) < 2:
        raise OHQError("inverted data needs a classifier with a known number (>= 2) of classes")
    return int(classes)


def _smoothness(bb: relax.BlockBuilder, x: relax.Var, channels: int) -> relax.Var:
    """Mean squared difference of horizontally and vertically neighbouring pixels of NCHW ``x``, as two
    depthwise convolutions (Relax differentiates conv2d, not strided_slice)."""
    total = None
    for kernel in (np.array([[-1.0, 1.0]]), np.array([[-1.0], [1.0]])):
        weight = np.broadcast_to(kernel, (channels, 1, *kernel.shape)).astype(np.float32)
        diff = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), groups=channels))
        term = bb.emit(relax.op.mean(relax.op.multiply(diff, diff)))
        total = term if total is None else bb.emit(relax.op.add(total, term))
    return total


def inversion_loss_module(imported: ImportedModel) -> tvm.IRModule:
    """``main(x, onehot) -> loss`` (module docstring; ``onehot`` is float32 ``[batch, K]``) and its
    gradient ``main_adjoint(x, onehot) -> (loss, (dloss/dx,))``.

    Raises :class:`OHQError` when the model is not a classifier (:func:`class_count`) or an operator in
    it has no gradient in Relax.
    """
    classes = class_count(imported)
    func = imported.mod["main"]
    (x,) = func.params
    batch = int(x.ty.shape[0])
    onehot = relax.Var("onehot", relax.TensorType([batch, classes], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, onehot]):
        with bb.dataflow():
            for block in func.body.blocks:
                for binding in block.bindings:
                    bb.emit_normalized(binding)
            log_probs = bb.emit(relax.op.nn.log_softmax(func.body.body))
            picked = relax.op.sum(relax.op.multiply(log_probs, onehot))
            loss = bb.emit(relax.op.divide(relax.op.negative(picked), relax.const(float(batch))))
            size = bb.emit(relax.op.mean(relax.op.multiply(x, x)))
            loss = bb.emit(relax.op.add(loss, relax.op.multiply(size, relax.const(L2_WEIGHT))))
            if x.ty.ndim == 4:
                smooth = _smoothness(bb, x, int(x.ty.shape[1]))
                loss = bb.emit(relax.op.add(loss, relax.op.multiply(smooth, relax.const(TV_WEIGHT))))
            output = bb.emit_output(loss)
        bb.emit_func_output(output)
    return with_input_gradient(bb.get(), "inverted data needs the gradient of every operator in the model")


def invertible(imported: ImportedModel) -> bool:
    """Whether :func:`inverted_batches` can make data for ``imported``: a classifier whose every
    operator Relax differentiates."""
    try:
        inversion_loss_module(imported)
    except OHQError:
        return False
    return True


def target_classes(imported: ImportedModel, count: int) -> list[np.ndarray]:
    """The class of each row of each of ``count`` inputs (module docstring), as ``[batch]`` arrays."""
    classes = class_count(imported)
    batch = int(imported.inputs[0].shape[0])
    return [(index * batch + np.arange(batch)) % classes for index in range(count)]


def _onehot(labels: np.ndarray, classes: int) -> np.ndarray:
    onehot = np.zeros((len(labels), classes), np.float32)
    onehot[np.arange(len(labels)), labels] = 1.0
    return onehot


def inverted_batches(
    imported: ImportedModel,
    count: int,
    *,
    iterations: int = ITERATIONS,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``count`` inputs inverted from the classifier (module docstring), each starting as
    standard-normal noise (``seed``) and taking ``iterations`` Adam steps of size ``learning_rate``
    (decaying along a cosine). ``progress(done, total)`` is called after each step. Raises
    :class:`OHQError` as :func:`inversion_loss_module` does.
    """
    classes = class_count(imported)
    step = host_functions(inversion_loss_module(imported))["main_adjoint"]
    targets = [tvm.runtime.tensor(_onehot(labels, classes)) for labels in target_classes(imported, count)]

    def gradient(index: int, image: np.ndarray) -> np.ndarray:
        _loss, (grad,) = step(tvm.runtime.tensor(image), targets[index])
        return grad.numpy()

    return optimised_inputs(imported, count, gradient, iterations, learning_rate, seed, progress)


def inversion_loss(imported: ImportedModel, batch: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """The inversion loss of one input for the given class of each row (for checks)."""
    vm = host_functions(inversion_loss_module(imported))
    (spec,) = imported.inputs
    onehot = _onehot(np.asarray(labels), class_count(imported))
    x = tvm.runtime.tensor(np.asarray(batch[spec.name], np.float32))
    return float(vm["main"](x, tvm.runtime.tensor(onehot)).numpy())


__all__ = [
    "L2_WEIGHT",
    "TV_WEIGHT",
    "class_count",
    "inversion_loss",
    "inversion_loss_module",
    "inverted_batches",
    "invertible",
    "target_classes",
]
