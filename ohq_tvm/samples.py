"""The batches the fp32 model runs on to calibrate and to score sensitivity: synthetic data, or the user's.

Synthetic data comes from the :data:`SYNTHETIC_DATA` registry, one named maker per kind, each called as
``maker(imported, count, seed, progress)``:

- :class:`RandomData` draws every input at random (``gaussian``, ``uniform``, ``matched``); it can also
  draw from tensor specs alone (:func:`synthetic_batches`);
- :class:`ModelMadeData` optimises inputs against the model itself (``distilled``: to its
  BatchNormalization statistics, :mod:`ohq_tvm.distill`; ``inverted``: to each class of a classifier in
  turn, :mod:`ohq_tvm.invert`).

``auto`` (:func:`resolve_synthetic`) picks the first model-made kind the model allows, else ``gaussian``.
The user's own samples are a folder of ``.npy`` arrays and/or images (:func:`load_samples`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .distill import distillable, distilled_batches
from .errors import OHQError
from .frontend import ImportedModel, TensorSpec
from .input_stats import matched_input_statistics
from .invert import inverted_batches, invertible

Batch = dict[str, np.ndarray]
Progress = Callable[[int, int], None] | None
# One input's values (any float dtype: the caller casts to the input's), drawn from a generator.
Draw = Callable[[np.random.Generator, TensorSpec], np.ndarray]

AUTO_SYNTHETIC = "auto"
FALLBACK_SYNTHETIC = "gaussian"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass(frozen=True)
class RandomData:
    """Inputs drawn at random: ``draw_for(onnx_model)`` gives the draw (it may read the ONNX model, and
    raises :class:`OHQError` when it needs one and gets ``None``)."""

    draw_for: Callable[[onnx.ModelProto | None], Draw]

    def batches(
        self,
        specs: Sequence[TensorSpec],
        count: int,
        seed: int = 0,
        onnx_model: onnx.ModelProto | None = None,
    ) -> list[Batch]:
        """``count`` batches of every input in ``specs``, from one generator seeded with ``seed``."""
        draw = self.draw_for(onnx_model)
        rng = np.random.default_rng(seed)
        return [{spec.name: draw(rng, spec).astype(spec.dtype) for spec in specs} for _ in range(count)]

    def __call__(
        self, imported: ImportedModel, count: int, seed: int = 0, progress: Progress = None
    ) -> list[Batch]:
        return self.batches(imported.inputs, count, seed, imported.onnx_model)


@dataclass(frozen=True)
class ModelMadeData:
    """Inputs optimised against the model: ``make(imported, count, seed=, progress=)`` when
    ``possible(imported)``; ``activity`` says what it does for ``count`` inputs (a progress line)."""

    make: Callable[..., list[Batch]]
    possible: Callable[[ImportedModel], bool]
    activity: str

    def __call__(
        self, imported: ImportedModel, count: int, seed: int = 0, progress: Progress = None
    ) -> list[Batch]:
        return self.make(imported, count, seed=seed, progress=progress)

    def describe(self, count: int) -> str:
        return self.activity.format(count=count)


def _standard_normal(rng: np.random.Generator, spec: TensorSpec) -> np.ndarray:
    return rng.standard_normal(spec.shape)


def _uniform(rng: np.random.Generator, spec: TensorSpec) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, spec.shape)


def _matched(onnx_model: onnx.ModelProto | None) -> Draw:
    """Per-channel normal for the input whose statistics match the BatchNormalization after the model's
    first conv (:func:`ohq_tvm.input_stats.matched_input_statistics`); standard normal for the others."""
    if onnx_model is None:
        raise OHQError("matched synthetic data needs the ONNX model")
    name, mean, std = matched_input_statistics(onnx_model)

    def draw(rng: np.random.Generator, spec: TensorSpec) -> np.ndarray:
        if spec.name != name:
            return rng.standard_normal(spec.shape)
        shape = [1] * len(spec.shape)
        shape[1] = -1
        return mean.reshape(shape) + std.reshape(shape) * rng.standard_normal(spec.shape)

    return draw


# Model-made kinds in the order ``auto`` tries them.
SYNTHETIC_DATA: dict[str, RandomData | ModelMadeData] = {
    "gaussian": RandomData(lambda _onnx_model: _standard_normal),
    "uniform": RandomData(lambda _onnx_model: _uniform),
    "matched": RandomData(_matched),
    "distilled": ModelMadeData(
        distilled_batches,
        distillable,
        "distilling {count} inputs from the model's BatchNormalization statistics",
    ),
    "inverted": ModelMadeData(
        inverted_batches,
        invertible,
        "inverting the classifier: {count} inputs it assigns to each class in turn",
    ),
}
# The kinds registered at import; code that must see a kind registered later reads SYNTHETIC_DATA.
SYNTHETIC_KINDS = tuple(SYNTHETIC_DATA)


def synthetic_choices() -> list[str]:
    """What a user may ask for: ``auto`` and every registered kind."""
    return [AUTO_SYNTHETIC, *SYNTHETIC_DATA]


def synthetic_label(kind: str = FALLBACK_SYNTHETIC) -> str:
    """How results computed on synthetic batches of ``kind`` name their data (``"synthetic:gaussian"``)."""
    return f"synthetic:{kind}"


def synthetic_batches(
    specs: Sequence[TensorSpec],
    count: int,
    kind: str = FALLBACK_SYNTHETIC,
    seed: int = 0,
    onnx_model: onnx.ModelProto | None = None,
) -> list[Batch]:
    """``count`` batches of random inputs of a :class:`RandomData` kind.

    ``gaussian``: standard normal. ``uniform``: uniform on [-1, 1] (image-like). ``matched``: per-channel
    normal whose first-layer statistics match the BatchNormalization after the model's first conv
    (needs ``onnx_model``). ``distilled`` and ``inverted`` data need the model: :func:`synthetic_data`.
    """
    if kind not in SYNTHETIC_DATA:
        raise OHQError(f"unknown synthetic data {kind!r}; use one of {', '.join(SYNTHETIC_DATA)}")
    maker = SYNTHETIC_DATA[kind]
    if not isinstance(maker, RandomData):
        raise OHQError(f"{kind} data is made from the model itself: use synthetic_data(imported, ...)")
    return maker.batches(specs, count, seed, onnx_model)


def resolve_synthetic(imported: ImportedModel, kind: str) -> str:
    """``kind``, with ``auto`` resolved to the first model-made kind ``imported`` allows: ``distilled``
    when data can be distilled from the model (:func:`ohq_tvm.distill.distillable`: the ONNX file has
    BatchNormalization statistics after its convs, and Relax differentiates what comes before them), else
    ``inverted`` for a classifier (:func:`ohq_tvm.invert.invertible`: one ``[batch, classes]`` output,
    every operator differentiable), else ``gaussian``. Raises :class:`OHQError` for an unknown kind."""
    if kind == AUTO_SYNTHETIC:
        for name, maker in SYNTHETIC_DATA.items():
            if isinstance(maker, ModelMadeData) and maker.possible(imported):
                return name
        return FALLBACK_SYNTHETIC
    if kind not in SYNTHETIC_DATA:
        raise OHQError(f"unknown synthetic data {kind!r}; use one of {', '.join(synthetic_choices())}")
    return kind


def synthetic_data(
    imported: ImportedModel,
    count: int,
    kind: str = FALLBACK_SYNTHETIC,
    seed: int = 0,
    progress: Progress = None,
) -> list[Batch]:
    """``count`` synthetic batches of ``kind`` for ``imported``, made by its :data:`SYNTHETIC_DATA` maker:
    :func:`synthetic_batches` for random kinds; for ``distilled`` inputs optimised to the model's
    BatchNormalization statistics (:func:`ohq_tvm.distill.distilled_batches`), for ``inverted`` inputs the
    classifier assigns to each class in turn (:func:`ohq_tvm.invert.inverted_batches`); both call
    ``progress(step, steps)``. ``kind`` may be ``auto`` (:func:`resolve_synthetic`). Raises
    :class:`OHQError` as those do."""
    kind = resolve_synthetic(imported, kind)
    return SYNTHETIC_DATA[kind](imported, count, seed, progress)


@dataclass(frozen=True)
class ImageNormalization:
    """How images become tensors: ``(pixel / 255 - mean) / std`` per channel, NCHW, RGB."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


NORMALIZATIONS = {
    "imagenet": ImageNormalization(),
    "tf": ImageNormalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # (x/255 - 0.5) / 0.5, EfficientNet-Lite
    "unit": ImageNormalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def load_image(
    path: str | os.PathLike, shape: Sequence[int], normalization: ImageNormalization
) -> np.ndarray:
    """One image as a ``[1, 3, H, W]`` float32 tensor: shorter side resized, centre-cropped, normalised."""
    try:
        # Pillow is only needed for image samples; a missing one is named here, not at import.
        from PIL import Image
    except ImportError:
        raise OHQError("reading images needs Pillow: pip install pillow") from None
    _, channels, height, width = shape
    if channels != 3:
        raise OHQError(f"image samples need a 3-channel input, not shape {list(shape)}")
    try:
        image = Image.open(path).convert("RGB")
    except OSError as err:
        raise OHQError(f"cannot read image {path}: {err}") from None
    factor = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * factor)), max(height, round(image.height * factor)))
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), np.float32) / 255.0
    normalized = (pixels - np.array(normalization.mean, np.float32)) / np.array(normalization.std, np.float32)
    return normalized.transpose(2, 0, 1)[None].astype(np.float32)


def load_samples(
    path: str | os.PathLike, specs: Sequence[TensorSpec], normalization: str = "imagenet"
) -> list[Batch]:
    """User samples for a single-input model: a folder of ``.npy`` arrays and/or images, or one ``.npy``.

    An array may carry the batch dimension or not; its shape must otherwise match the input. Raises
    :class:`OHQError` for a missing path, an empty folder, a shape mismatch or an unreadable file.
    """
    if len(specs) != 1:
        raise OHQError("sample folders work for single-input models; pass batches from Python instead")
    spec = specs[0]
    root = Path(path)
    if not root.exists():
        raise OHQError(f"calibration samples {root} do not exist")
    files = sorted(root.iterdir()) if root.is_dir() else [root]
    files = [f for f in files if f.suffix.lower() in _IMAGE_SUFFIXES | {".npy"}]
    if not files:
        raise OHQError(f"no .npy or image files in {root}")
    if normalization not in NORMALIZATIONS:
        raise OHQError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    batches = []
    for file in files:
        if file.suffix.lower() == ".npy":
            try:
                array = np.load(file)
            except (OSError, ValueError) as err:
                raise OHQError(f"cannot read {file}: {err}") from None
            if array.shape == tuple(spec.shape[1:]):
                array = array[None]
            if array.shape != tuple(spec.shape):
                raise OHQError(
                    f"{file} has shape {list(array.shape)}; input {spec.name} is {list(spec.shape)}"
                )
        else:
            array = load_image(file, spec.shape, NORMALIZATIONS[normalization])
        batches.append({spec.name: array.astype(spec.dtype)})
    return batches


__all__ = [
    "AUTO_SYNTHETIC",
    "NORMALIZATIONS",
    "SYNTHETIC_DATA",
    "SYNTHETIC_KINDS",
    "ImageNormalization",
    "ModelMadeData",
    "RandomData",
    "load_image",
    "load_samples",
    "resolve_synthetic",
    "synthetic_batches",
    "synthetic_choices",
    "synthetic_data",
    "synthetic_label",
]
