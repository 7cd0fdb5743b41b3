"""Benchmark: ExecuTorch XNNPACK int8 vs fp32, and vs our int8 TFLite of the same QuantizedModel, in one run.

    python -m benchmarks.bench_export_executorch --arch specs/tiny-mbv2.yaml --weights W.pt [--out out/bench-executorch]

One calibration → one QM → four artifacts: ExecuTorch int8 `.pte` (int8 I/O) and fp32 `.pte`, our int8 and
fp32 `.tflite`. Then, in this process:
  * export time of each writer from the same QM (imports already warm for both);
  * latency, batch 1, 1 and 2 threads: median over rounds of the mean invoke time in a round, the four
    models interleaved round by round so load changes on this shared machine hit all of them alike
    (ExecuTorch: `method.execute`, XNNPACK delegate; LiteRT: `invoke`, default XNNPACK delegate);
  * on N real test images: top-1 agreement and logit step errors of each int8 artifact vs the fake-quant
    sim with its own arithmetic (ExecuTorch: rounding="executorch", LiteRT + XNNPACK: "xnnpack") and vs the
    TFLite-rounding sim, and of ExecuTorch vs TFLite; accuracy of every artifact, the sims and the float model.
Prints a markdown table and writes OUT/results.json.

    python -m benchmarks.bench_export_executorch --agreement runs/etx/resnet20 runs/etx/sepnet ...

Agreement only, from folders `python -m export.executorch` wrote (its `.pte`, `.qm`, verify/ inputs and expected
codes): ExecuTorch vs that sim and vs LiteRT + XNNPACK running our `.tflite` of the same `.qm`, one markdown row
per folder (+ OUT/agreement.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return {"top1": float((a.argmax(1) == b.argmax(1)).mean()), "within_1": float((d <= 1).mean()),
            "max_step": int(d.max()), "p99_step": float(np.percentile(d, 99)), "differing_codes": int((d > 0).sum())}


class _Timed:
    """One artifact ready to invoke repeatedly on one fixed input."""

    def __init__(self, kind: str, path: Path, x_codes: np.ndarray, qin: tuple[float, int], threads: int) -> None:
        if kind.startswith("executorch"):
            from export.executorch import ExecuTorchRunner

            r = ExecuTorchRunner(path, threads, qin if kind.endswith("fp32") else None)
            t = r.prepare(x_codes[:1])[0]
            self.invoke = lambda: r.method.execute([t])
        else:
            from export.tflite import LiteRTRunner

            r = LiteRTRunner(path, "xnnpack", threads)
            x = x_codes[0]
            if kind.endswith("fp32"):
                x = ((x.astype(np.float32) - qin[1]) * np.float32(qin[0])).astype(np.float32)
            r.interp.set_tensor(r.input["index"], x[None])
            self.invoke = r.interp.invoke


def latencies(paths: dict[str, Path], x: np.ndarray, qin: tuple[float, int], threads: int, rounds: int,
              per_round: int) -> dict[str, float]:
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)  # ExecuTorch's XNNPACK pool is process-wide
    models = {k: _Timed(k, p, x, qin, threads) for k, p in paths.items()}
    for m in models.values():
        for _ in range(20):
            m.invoke()
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                m.invoke()
            times[k].append((time.perf_counter() - t0) / per_round * 1e3)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_export_executorch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="specs/tiny-mbv2.yaml")
    p.add_argument("--weights", help="float weights (default: seeded random init, BN re-estimated)")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=15, help="latency rounds (default 15)")
    p.add_argument("--per-round", type=int, default=40, help="invokes per round (default 40)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="out/bench-executorch")
    p.add_argument("--agreement", nargs="+", metavar="DIR", help="agreement only, from export.executorch folders")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.agreement:
        return agreement_from_exports([Path(d) for d in args.agreement], Path(args.out))

    from calibration import calibrate, simulate
    from calibration.sim import input_codes
    from export import executorch as E
    from export import tflite as T
    from export.verify import float_accuracy
    from ghnq.data import load_eval_images
    from ghnq.fileio import atomic_write_text
    from ghnq.spec import build_model, load_spec, spec_name
    from ghnq.weights import obtain_weights

    out = Path(args.out)
    spec = load_spec(args.arch)
    name = spec_name(spec)
    model = build_model(spec)
    weights = obtain_weights(model, args.weights)
    calib, _, calib_src = load_eval_images(args.calib_images, split="train", quiet=True)
    images, labels, eval_src = load_eval_images(args.eval_images, split="test", quiet=True)
    t0 = time.perf_counter()
    qm = calibrate(model, calib, bn_recalibrate=args.weights is None, progress=False, meta={"name": name})
    calib_s = time.perf_counter() - t0

    export_s: dict[str, float] = {}
    paths: dict[str, Path] = {}
    t0 = time.perf_counter()
    paths["executorch int8"], prog8 = E.write_pte(qm, out / f"{name}_xnnpack.pte")
    export_s["executorch int8"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths["executorch fp32"], _ = E.write_pte(qm, out / f"{name}_fp32.pte", fp32=True)
    export_s["executorch fp32"] = time.perf_counter() - t0
    for kind, fp32, suffix in (("tflite int8", False, "int8"), ("tflite fp32", True, "fp32")):
        t0 = time.perf_counter()
        paths[kind] = T.write_tflite(qm, out / f"{name}_{suffix}.tflite", fp32=fp32)
        export_s[kind] = time.perf_counter() - t0

    x = input_codes(images)
    tin = qm.tensors[qm.input]
    qin = tin.qparams
    sim = simulate(qm, images, rounding="executorch")
    sim_xnn = simulate(qm, images, rounding="xnnpack")
    sim_tfl = simulate(qm, images)
    et = E.ExecuTorchRunner(paths["executorch int8"])(x)
    tfl = T.LiteRTRunner(paths["tflite int8"], "xnnpack")(x)
    et32 = E.ExecuTorchRunner(paths["executorch fp32"], fp32_input=qin)(x)
    tfl32 = T.LiteRTRunner(paths["tflite fp32"], "xnnpack")((x.astype(np.float32) - qin[1]) * np.float32(qin[0]))
    acc = {"executorch int8": et, "executorch fp32": et32, "tflite int8": tfl, "tflite fp32": tfl32, "sim": sim}
    res: dict[str, Any] = {
        "name": name, "spec": args.arch, "weights": weights, "calibration_source": calib_src,
        "eval_source": eval_src, "images": len(images), "calibrate_s": round(calib_s, 3),
        "export_s": {k: round(v, 3) for k, v in export_s.items()}, "lower_s": prog8.seconds,
        "size_bytes": {k: p.stat().st_size for k, p in paths.items()},
        "delegation": prog8.delegation["outside_delegate"] or "all delegated",
        "executorch_vs_sim": agreement(et, sim), "tflite_vs_sim": agreement(tfl, sim_xnn),
        "executorch_vs_tflite_rounding_sim": agreement(et, sim_tfl), "executorch_vs_tflite": agreement(et, tfl),
        "accuracy": {k: float((v.argmax(1) == labels).mean()) for k, v in acc.items()},
        "latency_ms": {},
    }
    res["accuracy"]["float"] = float_accuracy(model, images, labels)
    for th in args.threads:
        res["latency_ms"][f"{th} thread{'s' * (th > 1)}"] = latencies(paths, x, qin, th, args.rounds, args.per_round)
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    print(table(res))
    return 0


def agreement_from_exports(dirs: list[Path], out: Path) -> int:
    """One row per `python -m export.executorch` folder: ExecuTorch vs the sim its report was verified against
    (verify/expected_int8.npy) and vs LiteRT + XNNPACK running our `.tflite` of the same `.qm`; the report's
    own comparisons with the other sims are copied (no sim is recomputed: 1,000 images × 3 sims is minutes)."""
    import os

    from calibration.qmodel import load
    from export import executorch as E
    from export import tflite as T
    from ghnq.fileio import atomic_write_text

    rows = []
    for d in dirs:
        r = json.loads((d / "report.json").read_text())
        qm = load(r["artifacts"]["qm"])
        x = np.load(d / "verify" / "inputs_int8.npy")
        sim = np.load(d / "verify" / "expected_int8.npy")  # simulate(rounding=r["arithmetic"]) of these inputs
        t0 = time.perf_counter()
        et = E.ExecuTorchRunner(r["artifacts"]["int8"])(x)
        tfl = T.LiteRTRunner(T.build_tflite(qm), "xnnpack")(x)
        rows.append({"name": r["name"], "weights": r["weights"], "images": len(x), "arithmetic": r["arithmetic"],
                     "passed": r["passed"], "fp32_inside_delegate": E.fp32_inside_delegate(qm),
                     "executorch_vs_sim": agreement(et, sim), "executorch_vs_litert": agreement(et, tfl),
                     "litert_vs_sim": agreement(tfl, sim), "report_vs_tflite_sim": r.get("vs_tflite_sim"),
                     "report_vs_xnnpack_sim": r.get("vs_xnnpack_sim"), "export_seconds": r["stage_seconds"],
                     "seconds": round(time.perf_counter() - t0, 1), "load_average": os.getloadavg()})
    atomic_write_text(out / "agreement.json", json.dumps(rows, indent=1) + "\n")
    cols = ("executorch_vs_sim", "executorch_vs_litert", "litert_vs_sim")
    print("| model | fp32 inside delegate | verified | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{100 * row[c]['top1']:.1f} % / {100 * row[c]['within_1']:.2f} % / {row[c]['max_step']} / "
                 f"{row[c]['differing_codes']:,}" for c in cols]
        fp32 = ", ".join(f"{k} ×{v}" for k, v in row["fp32_inside_delegate"].items()) or "—"
        print(f"| {row['name']} ({row['images']} images) | {fp32} | {row['passed']} | " + " | ".join(cells) + " |")
    print("(cells: top-1 agreement / logits within 1 step / max step / differing logit codes; sim = the report's "
          "verify/expected_int8.npy)")
    return 0


def table(r: dict[str, Any]) -> str:
    lines = [f"{r['name']} ({r['weights']}), {r['images']} test images ({r['eval_source']})", "",
             "| artifact | size (KB) | export (s) | " + " | ".join(f"latency {k} (ms)" for k in r["latency_ms"])
             + " | accuracy |", "|---|---|---|" + "---|" * len(r["latency_ms"]) + "---|"]
    for k in r["export_s"]:
        lat = " | ".join(f"{v[k]:.3f}" for v in r["latency_ms"].values())
        lines.append(f"| {k} | {r['size_bytes'][k] / 1024:.0f} | {r['export_s'][k]:.1f} | {lat} | "
                     f"{100 * r['accuracy'][k]:.2f} % |")
    for th, v in r["latency_ms"].items():
        lines.append(f"\nint8 speed-up over fp32, {th}: ExecuTorch {v['executorch fp32'] / v['executorch int8']:.2f}×, "
                     f"TFLite {v['tflite fp32'] / v['tflite int8']:.2f}×; ExecuTorch int8 / TFLite int8 latency "
                     f"{v['executorch int8'] / v['tflite int8']:.2f}×")
    lines += ["", "| int8 logits | top-1 agreement | within 1 step | max step | differing codes |",
              "|---|---|---|---|---|"]
    for k in ("executorch_vs_sim", "tflite_vs_sim", "executorch_vs_tflite_rounding_sim", "executorch_vs_tflite"):
        a = r[k]
        lines.append(f"| {k.replace('_', ' ')} | {100 * a['top1']:.2f} % | {100 * a['within_1']:.2f} % | "
                     f"{a['max_step']} | {a['differing_codes']} |")
    lines.append(f"\naccuracy: sim {100 * r['accuracy']['sim']:.2f} %, float {100 * r['accuracy']['float']:.2f} %")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
