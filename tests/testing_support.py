"""Helpers the tests share: process leak checks and tiny compiled modules."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from ohq_tvm import Precision, models
from ohq_tvm.board.owner_watch import OWNER_ENV
from ohq_tvm.frontend import load_onnx
from ohq_tvm.ilp import Budgets, Problem, greedy, pareto_frontier, solve
from ohq_tvm.mqe import Sensitivity
from ohq_tvm.oqa import TimingConfig, extract_workloads
from ohq_tvm.oqa.in_model import InModelScales, UniformRun
from ohq_tvm.oqa.measure import MeasureSummary
from ohq_tvm.oqa.run import ModelMeasurement
from ohq_tvm.passes import AnnotateCandidates
from ohq_tvm.plan import Plan
from ohq_tvm.planner import PlanningResult
from ohq_tvm.targets import resolve_target


def owned_processes(owner: int | None = None) -> dict[int, str]:
    """Live (non-zombie) processes the boards of process ``owner`` (default: this one) started, described
    for a failure message: those whose environment names ``owner`` in ``$OHQ_TVM_OWNER_PID`` (set by
    ``ProcessGroup`` and inherited by the servers' own children). Other runs' processes are not counted."""
    owner = os.getpid() if owner is None else owner
    described = {}
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.environ().get(OWNER_ENV) != str(owner):
                continue
            described[proc.pid] = (
                f"ppid={proc.ppid()} pgid={os.getpgid(proc.pid)} status={proc.status()} "
                f"age={time.time() - proc.create_time():.1f}s cmd={' '.join(proc.cmdline())}"
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return described


def tvm_exec_processes(owner: int | None = None) -> set[int]:
    """PIDs of the `python -m tvm.exec.*` processes of :func:`owned_processes`."""
    return {pid for pid, text in owned_processes(owner).items() if "tvm.exec." in text}


def new_tvm_exec_processes(before: set[int], owner: int | None = None) -> dict[int, str]:
    """``tvm.exec`` processes of ``owner``'s boards running now that are not in ``before``, described."""
    return {
        pid: text for pid, text in owned_processes(owner).items() if "tvm.exec." in text and pid not in before
    }


@contextlib.contextmanager
def silent_peer() -> Iterator[int]:
    """A process on 127.0.0.1 that accepts every TCP connection and never answers (a hung server, or
    something that is not an RPC server); yields its port."""
    script = (
        "import socket\n"
        "listener = socket.create_server(('127.0.0.1', 0))\n"
        "print(listener.getsockname()[1], flush=True)\n"
        "held = []\n"
        "while True:\n"
        "    held.append(listener.accept()[0])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def gone(pid: int) -> bool:
    """True when the process no longer runs (a zombie awaiting reaping counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def host_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def build_add_library(path, shape=(4, 4)) -> str:
    """A Relax module returning (x + x, x * x), exported for the host."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([relax.op.add(x, x), relax.op.multiply(x, x)]))
        bb.emit_func_output(out)
    relax.build(bb.get(), host_target()).export_library(str(path))
    return str(path)


def run_local(mod: tvm.IRModule, *inputs) -> list:
    """Build ``mod`` for the host with the default schedule and return its outputs as numpy arrays."""
    import numpy as np

    from ohq_tvm.codegen.schedules import build_scheduled

    vm = relax.VirtualMachine(build_scheduled(mod, host_target()), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    if hasattr(result, "numpy"):
        return [result.numpy()]
    return [result[i].numpy() for i in range(len(result))]


def conv2d_int_reference(data, weight, strides=(1, 1), padding=(0, 0, 0, 0), groups=1, pad_value=0):
    """Exact integer NCHW/OIHW conv2d in int64 (``padding`` is top, left, bottom, right)."""
    import numpy as np

    top, left, bottom, right = padding
    padded = np.pad(
        data.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value
    )
    n, _cin, height, width = padded.shape
    out_c, cin_group, kh, kw = weight.shape
    out_h = (height - kh) // strides[0] + 1
    out_w = (width - kw) // strides[1] + 1
    grouped_w = weight.astype(np.int64).reshape(groups, out_c // groups, cin_group, kh, kw)
    out = np.zeros((n, groups, out_c // groups, out_h, out_w), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = padded[
                :, :, i : i + strides[0] * out_h : strides[0], j : j + strides[1] * out_w : strides[1]
            ]
            patch = patch.reshape(n, groups, cin_group, out_h, out_w)
            out += np.einsum("ngchw,goc->ngohw", patch, grouped_w[..., i, j])
    return out.reshape(n, out_c, out_h, out_w)


# The installed console script, run from a neutral folder (from the repository root, `python -m ohq_tvm`
# would import the source folder rather than the installed package).
OHQ_TVM = Path(sys.executable).parent / "ohq-tvm"


def ohq(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the console script with ``args`` (and ``env`` on top of this process's environment)."""
    return subprocess.run(
        [str(OHQ_TVM), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and one ``error:`` line, the last thing on stderr (progress bars may precede it)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    bars = re.compile(r"^\s*(measuring|re-timing|sensitivity|tuning):")
    lines = [line for line in proc.stderr.strip().splitlines() if not bars.match(line.split("\r")[-1])]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_input_gradient_is_right(vm, x: np.ndarray, *args, seed: int = 8) -> None:
    """``vm["main_adjoint"](x, *args)`` against ``vm["main"]``: the same loss, and a derivative matching
    central finite differences along a direction half the gradient (a derivative well above float32
    noise), half random."""

    def at(point: np.ndarray) -> float:
        return float(vm["main"](tvm.runtime.tensor(point.astype(np.float32)), *args).numpy())

    loss, (gradient,) = vm["main_adjoint"](tvm.runtime.tensor(x.astype(np.float32)), *args)
    grad = gradient.numpy().astype(np.float64)
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    direction = grad / np.linalg.norm(grad) + noise / np.linalg.norm(noise)
    direction /= np.linalg.norm(direction)
    step = 1e-2
    assert float(loss.numpy()) == pytest.approx(at(x), rel=1e-6)
    numeric = (at(x + step * direction) - at(x - step * direction)) / (2 * step)
    analytic = float((grad * direction).sum())
    assert analytic > 1e-2
    assert numeric == pytest.approx(analytic, rel=0.03)


# Operator timings short enough for tests: 2 repeats of at least 5 ms after one warm-up run.
FAST_TIMING = TimingConfig(repeat=2, min_repeat_ms=5, warmup=1)


def fp32_int8_workloads(model=None) -> list:
    """The unique workloads of ``model`` (default: an 8-channel 8x8 conv) with every layer's candidates
    fp32 and int8."""
    imported = load_onnx(model or models.conv_model(channels=8, size=8))
    annotated = AnnotateCandidates([Precision.FP32, Precision.INT8], pin_first_last=False)(imported.mod)
    return extract_workloads(annotated).unique()


def every_model_slow_at_full_size() -> list:
    """The generated models' names for ``parametrize``; the 224x224 MobileNetV2 and EfficientNet-Lite0,
    15-25 s each on a 2-core host, marked slow (``make test-slow``)."""
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in ("mobilenet_v2", "efficientnet_lite0") else name
        for name in sorted(models.MODELS)
    ]


def same_padded_conv_model(height: int = 15, width: int = 16, channels: int = 4) -> onnx.ModelProto:
    """A stride-2 3x3 conv with TensorFlow's "SAME" padding and a flatten, written the way
    ``torch.onnx.export(..., dynamo=False)`` writes them: the pads computed from ``Shape`` → ``Gather`` →
    arithmetic → ``Concat`` into ``Pad``, the flattened shape from ``Shape`` → ``Gather`` → ``Unsqueeze`` →
    ``Concat`` into ``Reshape``. Input ``input`` [1, 3, height, width]; with 15 x 16 the pads are
    (top 1, left 0, bottom 1, right 1)."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    initializers = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "conv.weight"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(3, np.int64), "kernel"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "no_pads"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
    ]

    def node(op: str, inputs: list[str], name: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    shape = node("Shape", ["input"], "in_shape")
    before, after = {}, {}
    for axis, side in ((2, "h"), (3, "w")):
        size = node("Gather", [shape, f"{side}_axis"], f"{side}_size", axis=0)
        initializers.append(numpy_helper.from_array(np.array(axis, np.int64), f"{side}_axis"))
        out = node("Div", [node("Add", [size, "one"], f"{side}_plus1"), "two"], f"{side}_out")
        span = node(
            "Add",
            [node("Mul", [node("Sub", [out, "one"], f"{side}_m1"), "two"], f"{side}_x2"), "kernel"],
            f"{side}_span",
        )
        total = node("Max", [node("Sub", [span, size], f"{side}_excess"), "zero"], f"{side}_total")
        first = node("Div", [total, "two"], f"{side}_before")
        before[side] = node("Unsqueeze", [first, "axes0"], f"{side}_before1d")
        after[side] = node(
            "Unsqueeze", [node("Sub", [total, first], f"{side}_after"), "axes0"], f"{side}_after1d"
        )
    pads = node(
        "Concat", ["no_pads", before["h"], before["w"], "no_pads", after["h"], after["w"]], "pads", axis=0
    )
    padded = node("Pad", ["input", pads], "same_pad")
    conv = node("Conv", [padded, "conv.weight"], "conv", kernel_shape=[3, 3], strides=[2, 2])
    batch = node(
        "Unsqueeze",
        [node("Gather", [node("Shape", [conv], "conv_shape"), "zero"], "batch", axis=0), "axes0"],
        "batch1d",
    )
    flat_shape = node("Concat", [batch, "rest"], "flat_shape", axis=0)
    node("Reshape", [conv, flat_shape], "output")
    out_size = channels * ((height + 1) // 2) * ((width + 1) // 2)
    graph = helper.make_graph(
        nodes,
        "same_padded_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, out_size])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def nms_model(boxes: int = 8) -> onnx.ModelProto:
    """One ``NonMaxSuppression`` node ``nms``: how many boxes it keeps depends on the input values."""
    constants = [
        numpy_helper.from_array(np.array([5], np.int64), "max_boxes"),
        numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
        numpy_helper.from_array(np.array([0.1], np.float32), "min_score"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node(
                "NonMaxSuppression", ["boxes", "scores", *(c.name for c in constants)], ["kept"], name="nms"
            )
        ],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, boxes, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, boxes]),
        ],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, ["kept", 3])],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# (fp32 ms, int8 ms, int8 KL) per layer: int8 is faster everywhere, its loss spans three decades.
LAYERS = {
    "stem_conv": (0.4121, 0.2313, 0.0812),
    "dw1": (0.1502, 0.1207, 0.0021),
    "pw1": (0.2234, 0.1118, 0.0004),
    "expand2": (0.6345, 0.2871, 0.0009),
    "dw2": (0.3456, 0.2402, 0.0350),
    "project2": (0.5567, 0.2514, 0.0015),
    "classifier": (0.0311, 0.0236, 0.3100),
}
QUANTIZE_MS, DEQUANTIZE_MS, GLUE_MS = 0.0125, 0.0175, 0.0333
PREDICTED_LAYER = "classifier"  # its int8 latency comes from the latency model, not the board


def made_up_planning() -> PlanningResult:
    """What ``plan_model`` returns, built from the same calls (tiny_cnn's workloads, the real solver)
    with the board's numbers made up: :data:`LAYERS`, and the int8 latency of :data:`PREDICTED_LAYER`
    predicted by the latency model instead of measured."""
    imported = load_onnx(models.MODELS["tiny_cnn"]())
    annotated = AnnotateCandidates([Precision.FP32, Precision.INT8], pin_first_last=False)(imported.mod)
    workloads = extract_workloads(annotated)
    latencies = {}
    for layer_id, options in workloads.layers.items():
        for precision, workload in options.items():
            latencies[workload.key] = LAYERS[layer_id][0 if precision is Precision.FP32 else 1]
    for table, ms in ((workloads.quantize, QUANTIZE_MS), (workloads.dequantize, DEQUANTIZE_MS)):
        for workload in table.values():  # a conversion fused into a layer: the layer's latency + ms
            layer = workload.fused_layer
            latencies[workload.key] = ms + (latencies[layer.key] if layer is not None else 0.0)
    latencies.update({workload.key: GLUE_MS for workload in workloads.glue})
    predicted_key = workloads.layers[PREDICTED_LAYER][Precision.INT8].key
    measured = {key: ms for key, ms in latencies.items() if key != predicted_key}
    summary = MeasureSummary(
        "0123456789abcdef",
        "host-loopback",
        "default/r2",
        total=len(workloads.unique()),
        reused=20,
        measured=len(workloads.unique()) - 21,
        predicted_ms={predicted_key: latencies[predicted_key]},
        model_mape_percent=12.5,
    )
    measurement = ModelMeasurement(
        imported, resolve_target("host"), workloads, measured, summary, "/tmp/ohq/measurements.sqlite"
    )
    values = {layer_id: {Precision.INT8: kl} for layer_id, (_, _, kl) in LAYERS.items()}
    sensitivity = Sensitivity(values, "synthetic:gaussian", 4, 4 * (1 + len(LAYERS)), 2.5, board="host")

    problem = Problem(workloads, latencies, values)
    layers = list(workloads.layers)
    baselines = {p.value: Plan.uniform(layers, p) for p in (Precision.FP32, Precision.INT8)}
    for plan in baselines.values():
        plan.predicted = problem.evaluate(plan.assignments)
    budgets = Budgets(latency_ms=0.8 * baselines["fp32"].predicted["latency_ms"])
    plan = solve(problem, "sensitivity", budgets)
    baselines["greedy"] = greedy(problem, budgets.latency_ms)
    baselines["bops-proxy"] = solve(problem, "bops", Budgets(sensitivity=plan.predicted["sensitivity"]))
    return PlanningResult(plan, baselines, pareto_frontier(problem, 6), measurement, sensitivity, budgets)


def planned_on_unreliable_timing(planning: PlanningResult) -> PlanningResult:
    """``planning`` as if its uniform plans had been timed whole and still contradicted their parts
    after being timed again: uniform int8's parts add up to 10x its whole."""
    int8 = planning.baselines["int8"].predicted["latency_ms"]
    fp32 = planning.baselines["fp32"].predicted["latency_ms"]
    runs = {
        Precision.FP32: UniformRun(Precision.FP32, fp32, fp32 - 0.1, 0.1),
        Precision.INT8: UniformRun(Precision.INT8, int8 / 10, int8 - 0.1, 0.1),
    }
    problems = tuple(runs[Precision.INT8].problems())
    in_model = InModelScales(runs, problems, problems, {"some-part": 0.5}, 12)
    measurement = dataclasses.replace(planning.measurement, in_model=in_model)
    return dataclasses.replace(planning, measurement=measurement)
