"""ONNX → Relax with static input shapes, and every way that can go wrong as one clear line.

Models are taken as users' exporters write them: weights in external files beside the model, opsets
below 13 (upgraded, as the QDQ export needs 13), shapes computed at run time from static input shapes
(folded to constants). Errors raise :class:`ModelImportError` naming the file, the input or the node, and
the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import external_data_helper, helper, shape_inference, version_converter
from tvm import relax

from .errors import ModelImportError
from .onnx_fold import fold_batch_norms, fold_constants, fold_pads_into_convs
from .passes.canonicalize_clip import CanonicalizeClip
from .passes.layer_id import AssignLayerIds

_DEFAULT_DOMAINS = {"", "ai.onnx"}
# Handled by the importer itself rather than through its converter table.
_DIRECTLY_HANDLED = {"Constant", "If"}
# The QDQ export quantizes weights per channel, which ONNX has from opset 13 on: older models are upgraded.
MIN_OPSET = 13
# Operators whose output size depends on the input values: a static-shape build cannot hold their result.
_DATA_DEPENDENT_SHAPES = {"NonMaxSuppression", "NonZero", "Unique", "Compress"}


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a static shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ImportedModel:
    """A Relax module with static shapes and layer ids, next to the ONNX model it came from."""

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx_model: onnx.ModelProto
    source: str
    sha256: str
    # What the import changed in the model that its user should know (e.g. an upgraded opset).
    notes: tuple[str, ...] = ()


def parse_input_shapes(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``["input=1,3,224,224"]`` → ``{"input": (1, 3, 224, 224)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name.strip() or not shape or any(d <= 0 for d in shape):
            raise ModelImportError(
                f"--input-shape {item!r} is not of the form NAME=D0,D1,... with positive integers "
                f"(e.g. input=1,3,224,224)"
            )
        shapes[name.strip()] = shape
    return shapes


def _read(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, str]:
    """The model, what to call it in messages, and its SHA-256 (of the file, followed by the external
    files its weights are in, so that changed weights change the hash)."""
    if isinstance(model, onnx.ModelProto):
        external = _external_files(model)
        if external:
            raise ModelImportError(
                f"the given ModelProto keeps its weights in external files ({', '.join(external)}) it "
                f"cannot find; pass the model's path instead, or load it with onnx.load(path)"
            )
        raw = model.SerializeToString()
        return model, "<ModelProto>", hashlib.sha256(raw).hexdigest()
    path = Path(model)
    if not path.is_file():
        raise ModelImportError(f"model file {path} does not exist")
    raw = path.read_bytes()
    try:
        proto = onnx.load_from_string(raw)
    except Exception:
        proto = None
    if proto is None or not proto.graph.node:
        raise ModelImportError(f"{path} is not a valid ONNX model (it could not be parsed, or has no nodes)")
    external = _external_files(proto)
    if not external:
        return proto, str(path), hashlib.sha256(raw).hexdigest()
    try:  # exporters name external files relative to the model, not to where ohq-tvm runs
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelImportError(
            f"{path} keeps its weights in {', '.join(external)} beside it, which could not be read: {first}"
        ) from None
    digest = hashlib.sha256(raw)
    for location in external:
        digest.update((path.parent / location).read_bytes())
    return proto, str(path), digest.hexdigest()


def _external_files(model: onnx.ModelProto) -> list[str]:
    """The files ``model``'s initializers name as external storage, in order, each once."""
    locations = []
    for init in model.graph.initializer:
        if external_data_helper.uses_external_data(init):
            location = next((e.value for e in init.external_data if e.key == "location"), "?")
            if location not in locations:
                locations.append(location)
    return locations


def _upgrade_opset(model: onnx.ModelProto, source: str) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """``model`` at opset :data:`MIN_OPSET` at least, and a note when it was upgraded; raises
    :class:`ModelImportError` when ``onnx.version_converter`` cannot upgrade it."""
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), MIN_OPSET)
    if opset >= MIN_OPSET:
        return model, ()
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as err:
        lines = str(err).strip().splitlines()
        # The converter's assertions read "<file>:<line>: operator(): Assertion `...` failed: <reason>".
        reason = lines[0].rsplit(" failed: ", 1)[-1] if lines else type(err).__name__
        raise ModelImportError(
            f"{source} uses ONNX opset {opset}, and onnx.version_converter could not upgrade it to "
            f"{MIN_OPSET} (the QDQ export needs per-channel quantization): {reason}; export it again with "
            f"opset {MIN_OPSET} or later (e.g. torch.onnx.export(..., opset_version=17))"
        ) from None
    return upgraded, (
        f"upgraded {source} from ONNX opset {opset} to {MIN_OPSET} with onnx.version_converter",
    )


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _dtype(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _check_given_shape(vi: onnx.ValueInfoProto, shape: tuple[int, ...], source: str) -> None:
    """A shape given for input ``vi`` must have its rank and agree with every dimension the file fixes:
    ``--input-shape`` fills dynamic dimensions, it does not resize a model."""
    dims = vi.type.tensor_type.shape.dim
    if len(shape) != len(dims):
        raise ModelImportError(
            f"input {vi.name!r} of {source} has rank {len(dims)}, but the given shape "
            f"{','.join(map(str, shape))} has rank {len(shape)}"
        )
    static = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if any(size is not None and size != value for size, value in zip(static, shape, strict=True)):
        in_file = "x".join(
            str(size) if size is not None else dim.dim_param or "?"
            for size, dim in zip(static, dims, strict=True)
        )
        raise ModelImportError(
            f"input {vi.name!r} of {source} is {in_file} in the file, but the given shape is "
            f"{'x'.join(map(str, shape))}: only its dynamic dimensions can be given; drop "
            f"--input-shape {vi.name}=... or give the file's sizes"
        )


def _resolve_shapes(
    model: onnx.ModelProto, given: Mapping[str, Sequence[int]], source: str
) -> list[TensorSpec]:
    inputs = _graph_inputs(model)
    names = [vi.name for vi in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ModelImportError(
            f"{source} has no input named {', '.join(unknown)}; its inputs: {', '.join(names)}"
        )
    specs = []
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in given:
            shape = tuple(int(d) for d in given[vi.name])
            _check_given_shape(vi, shape, source)
        else:
            shape = tuple(int(d.dim_value) for d in dims if d.HasField("dim_value") and d.dim_value > 0)
            if len(shape) < len(dims):
                raise ModelImportError(_dynamic_dimension_fix(vi, source))
        specs.append(TensorSpec(vi.name, shape, _dtype(vi.type.tensor_type.elem_type)))
    return specs


def _dynamic_dimension_fix(vi: onnx.ValueInfoProto, source: str) -> str:
    """What is missing from input ``vi`` and the ``--input-shape`` that gives it: the file's static sizes
    kept, a dynamic batch (dimension 0) as 1, any other dynamic dimension as a name to replace."""
    dims = vi.type.tensor_type.shape.dim
    missing, suggested, placeholders = [], [], []
    for index, dim in enumerate(dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            suggested.append(str(dim.dim_value))
            continue
        missing.append(f"{index} ({dim.dim_param!r})" if dim.dim_param else str(index))
        if index == 0:
            suggested.append("1")
        else:
            placeholders.append(dim.dim_param.upper() if dim.dim_param.isidentifier() else f"D{index}")
            suggested.append(placeholders[-1])
    fix = f"--input-shape {vi.name}={','.join(suggested)}"
    if len(missing) == 1:
        what, value = f"a dynamic dimension {missing[0]}", "its value"
    else:
        what, value = f"dynamic dimensions {', '.join(missing)}", "their values"
    message = f"input {vi.name!r} of {source} has {what}; give {value} with {fix}"
    if placeholders:
        message += f", replacing {', '.join(placeholders)} by the sizes the model is to run at"
    return message


def _with_static_inputs(model: onnx.ModelProto, specs: Sequence[TensorSpec]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    by_name = {spec.name: spec for spec in specs}
    for vi in fixed.graph.input:
        if vi.name in by_name:
            dims = vi.type.tensor_type.shape.dim
            for dim, value in zip(dims, by_name[vi.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = value
    for out in fixed.graph.output:  # let shape inference fill dynamic output dims anew
        for dim in out.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    return fixed


def _check_operators(model: onnx.ModelProto, source: str) -> None:
    """Raise :class:`ModelImportError` naming every node TVM's importer has no converter for, or else
    every node whose output size depends on the input values."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = _get_convert_map()
    missing, data_dependent = [], []
    for node in model.graph.node:
        op = node.op_type
        foreign = node.domain not in _DEFAULT_DOMAINS
        if foreign or (op not in supported and op not in _DIRECTLY_HANDLED):
            label = f"{node.domain}::{op}" if foreign else op
            missing.append(f"{node.name or '<unnamed>'} ({label})")
        elif op in _DATA_DEPENDENT_SHAPES:
            data_dependent.append(f"{node.name or '<unnamed>'} ({op})")
    if missing:
        raise ModelImportError(
            f"{source} uses operators TVM's ONNX importer does not support: {', '.join(missing)}"
        )
    if data_dependent:
        raise ModelImportError(
            f"{source} uses operators whose output size depends on the input values, which a build with "
            f"static shapes cannot hold: {', '.join(data_dependent)}; export the model without them (e.g. "
            f"up to the box scores, with NonMaxSuppression run after it)"
        )


def _failing_node(err: BaseException) -> onnx.NodeProto | None:
    """The ONNX node TVM's importer was converting when it raised ``err``, if its traceback shows one
    (the importer itself names only the operator)."""
    node = None
    traceback = err.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "_construct_nodes" and isinstance(
            frame.f_locals.get("node"), onnx.NodeProto
        ):
            node = frame.f_locals["node"]
        traceback = traceback.tb_next
    return node


def _output_specs(model: onnx.ModelProto, mod: tvm.IRModule) -> list[TensorSpec]:
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    names = [o.name for o in model.graph.output]
    if len(fields) != len(names):
        raise ModelImportError(f"the imported module returns {len(fields)} values for {len(names)} outputs")
    specs = []
    for name, info in zip(names, fields, strict=True):
        shape = getattr(info, "shape", None)
        if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
            raise ModelImportError(
                f"output {name!r} of the imported model has no static shape ({shape}); ohq-tvm builds "
                f"static shapes only: give every dynamic input dimension with --input-shape"
            )
        specs.append(TensorSpec(name, tuple(int(d) for d in shape), str(info.dtype)))
    return specs


def load_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ImportedModel:
    """Import an ONNX model (a path or a ``ModelProto``) into a Relax module with static shapes.

    ``input_shapes`` fixes inputs whose shapes are dynamic in the file. Weights in external files are
    read from beside the model file. A model below opset :data:`MIN_OPSET` is upgraded with
    ``onnx.version_converter`` (said in ``notes``). Shapes computed at run time from the static input
    shapes are folded to constants first. Raises :class:`ModelImportError` for a missing or corrupt file,
    unreadable external weights, an invalid model, an opset that cannot be upgraded, a dynamic dimension
    with no value, an unknown input name, a wrong rank, a given shape that contradicts a static dimension
    of the file, an unsupported operator or one whose output size depends on the data (all of them, by
    node), or a converter failure (naming the node).
    """
    from tvm.relax.frontend.onnx import from_onnx

    proto, source, sha256 = _read(model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelImportError(f"{source} is not a valid ONNX model: {first}") from None
    # Fail here, not in the QDQ export after a whole pipeline.
    proto, notes = _upgrade_opset(proto, source)
    specs = _resolve_shapes(proto, input_shapes or {}, source)
    static = _with_static_inputs(proto, specs)
    with contextlib.suppress(Exception):  # a convenience; the converter computes shapes itself
        static = shape_inference.infer_shapes(static)
    # Exporters compute pads and reshapes from Shape at run time; TVM's importer needs them as constants.
    folded, _ = fold_constants(static)
    _check_operators(folded, source)
    # BN folded in ONNX, not Relax: each Relax conv weight is then an ONNX initializer (ids match by weight).
    folded, _ = fold_batch_norms(folded)
    # Explicit zero pads ("SAME" padding) become the conv's own padding: no float op between int layers.
    folded, _ = fold_pads_into_convs(folded)
    try:
        # The importer prints the failing operator to stdout; the error below names its node instead.
        with contextlib.redirect_stdout(io.StringIO()):
            mod = from_onnx(
                folded, shape_dict={s.name: list(s.shape) for s in specs}, keep_params_in_input=False
            )
    except Exception as err:
        lines = str(err).strip().splitlines()
        node = _failing_node(err)
        where = f" at node {node.name or '<unnamed>'} ({node.op_type})" if node is not None else ""
        raise ModelImportError(
            f"converting {source} to Relax failed{where}: {lines[-1] if lines else type(err).__name__}"
        ) from err
    # Constant bias reshapes and Gemm weight transposes become constants, as layers and rewrites expect.
    mod = relax.transform.FoldConstant()(mod)
    # ReLU6 and other constant Clips as relax.clip, not opaque TE calls: layers can then own them.
    mod = CanonicalizeClip()(mod)
    # Name every conv/dense after its ONNX node, so plans and reports speak the user's names.
    mod = AssignLayerIds(folded)(mod)
    return ImportedModel(
        mod=mod,
        inputs=specs,
        outputs=_output_specs(static, mod),
        onnx_model=static,
        source=source,
        sha256=sha256,
        notes=notes,
    )


def module_inputs(mod: tvm.IRModule, given: Sequence[TensorSpec] | None = None) -> list[TensorSpec]:
    """The inputs of ``mod``'s ``main``, in parameter order, for a module not imported by
    :func:`load_onnx` (e.g. by ``tvm.relax.frontend.onnx.from_onnx``).

    Without ``given``, read from the parameters, whose shapes must be static. With ``given``, those
    specs, put in parameter order. Raises :class:`ModelImportError` for a dynamic shape and no spec, or a
    ``given`` that names other inputs than ``main``'s or contradicts a static dimension.
    """
    params = mod["main"].params
    by_name = {spec.name: spec for spec in given or ()}
    names = [param.name for param in params]
    if given is not None and sorted(by_name) != sorted(names):
        raise ModelImportError(
            f"input specs name {', '.join(sorted(by_name)) or 'nothing'}; main's inputs are "
            f"{', '.join(names)}"
        )
    specs = []
    for param, name in zip(params, names, strict=True):
        info = param.ty
        shape = getattr(info, "shape", None)
        dims = (
            [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in shape] if shape is not None else []
        )
        spec = by_name.get(name)
        if spec is None:
            if not dims or None in dims:
                raise ModelImportError(
                    f"input {name!r} of main has no static shape ({info}); give its TensorSpec"
                )
            spec = TensorSpec(name, tuple(dims), str(info.dtype))
        elif len(dims) != len(spec.shape) or any(
            d not in (None, s) for d, s in zip(dims, spec.shape, strict=True)
        ):
            raise ModelImportError(f"input spec {name} {list(spec.shape)} contradicts main's {info}")
        specs.append(spec)
    return specs


def synthetic_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs: standard-normal floats, small non-negative integers for integer inputs."""
    rng = np.random.default_rng(seed)
    values = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            values[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype == np.bool_:
            values[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
        else:
            values[spec.name] = rng.integers(0, 8, spec.shape).astype(dtype)
    return values
