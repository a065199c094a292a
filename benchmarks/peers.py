"""Peers: the runtimes a user could deploy instead of ohq-tvm, against its fp32 and uniform int8, in one run.

Usage: python benchmarks/peers.py [--models mobilenet_v2,efficientnet_lite0] [--repeats 15] [--out ...]
(needs `make peers`: torch, LiteRT, its converter and quantizer, the pretrained weights and the photos)

Per model (real ImageNet weights), every engine built in this run from the same torch model and calibrated
on the same 25 held-out crops, all on the same threads (every physical core: TVM's default here): the
peers of ``peer_engines`` (``litert fp32`` / ``int8``, ``ort fp32``, ``ort int8 u8s8 qdq`` / ``qoperator``,
``ort int8 s8s8 qdq``), and ``ohq-tvm fp32`` and ``ohq-tvm int8`` (every layer int8, the default schedule,
no tuning), as ``ohq-tvm compile`` builds them.

Latency: every engine timed in the same interleaved rounds (each timing averages runs over at least 100 ms,
starts after the other runtimes' threads went quiet, and is gated on the quiet canary of
``ohq_tvm.oqa.quiet``). Accuracy: top-1 agreement with ``ort fp32`` over 120 views of 24 photos.

Writes results/peers.json (machine, versions, settings, raw numbers) and results/peers.md: per model, the
fastest peer in int8 and in fp32, and ohq-tvm's ratio to each.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tvm
from accuracy import MODELS
from accuracy_report import metrics
from peer_engines import (
    PEER_INT8,
    build_peers,
    fastest,
    peer_settings,
    real_model,
    target_lines,
    tvm_engine,
)

from ohq_tvm.board import sigterm_as_exit, use_host_threads
from ohq_tvm.oqa.quiet import QuietGate
from ohq_tvm.pipeline import compile_model
from ohq_tvm.targets import resolve_target

from timing import BenchmarkRun, Rounds, conditions, interleaved, parse_args


def bench(name: str, scratch: Path, rounds: Rounds, say) -> dict:
    started = time.perf_counter()
    folder = scratch / name
    model = real_model(MODELS[name], folder)
    photos, x = model.photos, model.photos.views[0]
    engines = build_peers(model, folder, rounds.threads)
    say(f"[{name}] peers built in {time.perf_counter() - started:.0f} s")
    # Built as `ohq-tvm compile` builds them; checked against ONNX Runtime by the tests and the headline
    # (here: their top-1 agreement below).
    int8 = {"precision": "int8", "calibration_samples": photos.calibration_dir}
    for engine, options in (("ohq-tvm fp32", {}), ("ohq-tvm int8", int8)):
        built = compile_model(
            model.with_bn, "host", folder / engine.replace(" ", "-"), verify=False, **options
        )
        engines[engine] = tvm_engine(built.library_path, x)
    say(f"[{name}] timing {len(engines)} engines, {rounds.repeats} interleaved rounds")
    timers = {e: engine.timer for e, engine in engines.items()}
    medians, raw = interleaved(timers, rounds.repeats, rounds.gate)
    logits = {e: np.concatenate([engine.run(v) for v in photos.views]) for e, engine in engines.items()}
    accuracy = {e: metrics(logits[e], logits["ort fp32"], photos.labelled) for e in engines}
    return {
        "model": name,
        "views": len(photos.views),
        "median_ms": medians,
        "raw_ms": raw,
        "accuracy": {
            engine: {k: v for k, v in a.items() if k not in ("top1_per_view", "kl_per_view")}
            for engine, a in accuracy.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(record: dict) -> list[str]:
    settings, machine = record["settings"], record["machine"]
    cpu = machine["cpu_model"]
    lines = [
        "# ohq-tvm against the runtimes a user could deploy instead",
        "",
        f"Machine: {cpu.get('model name', '?')} ({machine['cpu']}; int8 dot product: "
        f"{', '.join(cpu.get('int8_dot_product', [])) or 'none'}), {machine['cores']} cores, every engine on "
        f"{settings['threads']} threads; TVM {tvm.__version__}, ONNX Runtime {ort.__version__}, "
        f"LiteRT {settings['peers']['litert']}. {conditions(record)} Top-1 agreement with ORT fp32 over the "
        "same views.",
        "",
        "| model | engine | latency ms | vs fastest peer int8 | top-1 agreement with fp32 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in record["models"]:
        m = row["median_ms"]
        best = m[fastest(m, PEER_INT8)]
        for engine in sorted(m, key=m.__getitem__):
            acc = row["accuracy"][engine]
            lines.append(
                f"| {row['model']} | {engine} | {m[engine]:.2f} | {m[engine] / best:.2f}x | "
                f"{acc['top1_agreeing_views']}/{row['views']} |"
            )
    lines += ["", "Fastest engines, and ohq-tvm against them (targets of issue #25):", ""]
    return lines + target_lines(record["models"])


def main() -> None:
    args = parse_args(
        __doc__, repeats=15, extra={"--models": "mobilenet_v2,efficientnet_lite0", "--quiet-wait": "30"}
    )
    # How long a timing waits for the canary at its usual speed (timing.GATE's 30 s suits a host with slow
    # spells; on a host whose canary is always noisy every timing would wait it out).
    gate = QuietGate(max_wait_s=float(args.quiet_wait))
    rounds = Rounds(args.repeats, use_host_threads(), gate)  # TVM's threads in this process, the peers alike
    torch.set_num_threads(rounds.threads)
    run = BenchmarkRun("peers", resolve_target("host").tvm_target(), gate)
    with tempfile.TemporaryDirectory(prefix="ohq-peers-") as scratch:
        rows = [bench(n, Path(scratch), rounds, run.say) for n in args.models.split(",") if n]
    settings = {
        "repeats": args.repeats,
        "threads": rounds.threads,
        "peers": peer_settings(),
        "ohq_tvm": "default schedule, no tuning; int8: every layer, calibrated minmax on the same crops",
    }
    run.write(args.out, settings, markdown, models=rows)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback boards down
        main()
