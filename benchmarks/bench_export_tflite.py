"""Benchmark: our int8 TFLite export vs torch → ONNX → onnx2tf `-oiqt`, side by side in one run.

    python -m benchmarks.bench_export_tflite --arch specs/tiny-mbv2.yaml --weights W.pt [--out out/bench-tflite]

Same float weights and the same calibration images for both paths. Each export runs in its own fresh
process (so import cost and peak memory are its own), one after the other:
  * ours:    load weights → calibration (observers over the calibration images) → QuantizedModel → int8 +
             fp32 .tflite written from the schema object API;
  * onnx2tf: load weights → torch.onnx.export (TorchScript exporter: the dynamo one adds RESHAPE/TRANSPOSE) →
             onnx2tf.convert(output_integer_quantized_tflite, calibration data = the same images, with the
             model's normalization as -cind mean/std) → its `*_full_integer_quant.tflite` (int8 in/out).
Then in this process: LiteRT latency (XNNPACK, batch 1, 1 and 2 threads, models interleaved so load
changes hit all of them alike), top-1 agreement with our fake-quant sim and accuracy on test images, file
sizes, op histograms. Prints a markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Children: one export each, in a fresh process


def child_ours(work: Path, spec_path: str, weights: str) -> dict:
    t0 = time.perf_counter()
    from calibration import calibrate
    from calibration.qmodel import save
    from export.tflite import write_tflite
    from ghnq.spec import build_model, load_spec
    from ghnq.train import load_weights

    t1 = time.perf_counter()
    model = build_model(load_spec(spec_path))
    load_weights(model, weights)
    calib = np.load(work / "calib_uint8.npy")
    qm = calibrate(model, calib, bn_recalibrate=False, progress=False)
    t2 = time.perf_counter()
    write_tflite(qm, work / "ours_int8.tflite")
    write_tflite(qm, work / "ours_fp32.tflite", fp32=True)
    t3 = time.perf_counter()
    save(qm, work / "ours.qm")
    return {"import_s": t1 - t0, "export_s": t3 - t1, "calibrate_s": t2 - t1, "write_s": t3 - t2,
            "int8": str(work / "ours_int8.tflite"), "fp32": str(work / "ours_fp32.tflite")}


def child_onnx2tf(work: Path, spec_path: str, weights: str) -> dict:
    t0 = time.perf_counter()
    import onnx2tf
    import torch

    from ghnq.data import MEAN, STD
    from ghnq.spec import build_model, load_spec
    from ghnq.train import load_weights

    t1 = time.perf_counter()
    spec = load_spec(spec_path)
    model = build_model(spec).eval()
    load_weights(model, weights)
    c, h, w = spec["input"]
    onnx_path = work / "model.onnx"
    torch.onnx.export(model, (torch.zeros(1, c, h, w),), str(onnx_path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    t2 = time.perf_counter()
    calib = np.load(work / "calib_uint8.npy").astype(np.float32) / 255.0  # NHWC in [0, 1]; -cind normalizes
    np.save(work / "calib_float.npy", calib)
    # onnx2tf downloads a sample calibration file unless one of this name is in the working directory
    np.save(work / "calibration_image_sample_data_20x128x128x3_float32.npy",
            np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    mean = np.array(MEAN, np.float32).reshape(1, 1, 1, 3)
    std = np.array(STD, np.float32).reshape(1, 1, 1, 3)
    os.chdir(work)
    onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(work / "onnx2tf"),
                    output_integer_quantized_tflite=True, input_quant_dtype="int8", output_quant_dtype="int8",
                    custom_input_op_name_np_data_path=[["input", str(work / "calib_float.npy"), mean, std]],
                    non_verbose=True)
    t3 = time.perf_counter()
    int8 = next((work / "onnx2tf").glob("*_full_integer_quant.tflite"))
    fp32 = next((work / "onnx2tf").glob("*_float32.tflite"))
    return {"import_s": t1 - t0, "export_s": t3 - t1, "onnx_export_s": t2 - t1, "convert_s": t3 - t2,
            "int8": str(int8), "fp32": str(fp32)}


def run_child(kind: str, work: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",  # onnxsim by name
               PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_export_tflite", "--child", kind, "--work", str(work),
                        "--arch", args.arch, "--weights", str(work / "weights.pt")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{kind} export failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


# ----------------------------------------------------------------------------------------------------
# Measurements on the written files


class Model:
    def __init__(self, path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=path, num_threads=threads)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    def feed(self, x: np.ndarray) -> None:
        self.interp.set_tensor(self.inp["index"], x[None].astype(self.inp["dtype"]))

    def run_all(self, xs: np.ndarray) -> np.ndarray:
        outs = []
        for x in xs:
            self.feed(x)
            self.interp.invoke()
            outs.append(self.interp.get_tensor(self.out["index"])[0].copy())
        return np.stack(outs)


def latencies(paths: dict[str, str], threads: int, sample: dict[str, np.ndarray], rounds: int, per_round: int
              ) -> dict[str, float]:
    """Median over rounds of the mean invoke time (ms) in a round; models interleaved round by round."""
    models = {k: Model(p, threads) for k, p in paths.items()}
    for k, m in models.items():
        m.feed(sample[k])
        for _ in range(20):
            m.interp.invoke()
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                m.interp.invoke()
            times[k].append((time.perf_counter() - t0) / per_round * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def quantize_input(m: Model, x_float: np.ndarray) -> np.ndarray:
    s, zp = m.inp["quantization"]
    return np.clip(np.round(x_float / s) + zp, -128, 127).astype(np.int8)


def op_histogram(path: str) -> dict[str, int]:
    from export.tflite import op_histogram as hist

    return hist(Path(path).read_bytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_export_tflite", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="specs/tiny-mbv2.yaml")
    p.add_argument("--weights", help="float weights (default: seeded random init + BN re-estimated on the "
                   "calibration images, saved once and given to both paths)")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=15, help="latency rounds (default 15)")
    p.add_argument("--per-round", type=int, default=40, help="invokes per round (default 40)")
    p.add_argument("--out", default="out/bench-tflite")
    p.add_argument("--child", choices=["ours", "onnx2tf"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = child_ours if args.child == "ours" else child_onnx2tf
        res = fn(Path(args.work), args.arch, args.weights)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return 0

    import torch

    from calibration import simulate
    from calibration.qmodel import load
    from calibration.sim import input_codes
    from ghnq.data import MEAN, STD, load_eval_images
    from ghnq.spec import build_model, load_spec, spec_name
    from ghnq.train import load_weights

    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = load_spec(args.arch)
    calib, _, calib_src = load_eval_images(args.calib_images, split="train")
    np.save(work / "calib_uint8.npy", calib)
    model = build_model(spec)
    if args.weights:
        load_weights(model, args.weights)
        wdesc = f"file {args.weights}"
    else:
        from calibration.bn import recalibrate_bn
        from ghnq.weights import obtain_weights

        wdesc = obtain_weights(model, quiet=True)
        recalibrate_bn(model, calib, progress=False)
        wdesc += " + BN re-estimated on the calibration images"
    torch.save(model.state_dict(), work / "weights.pt")

    res = {"spec": args.arch, "name": spec_name(spec), "weights": wdesc, "calibration": calib_src,
           "calib_images": len(calib), "load_avg_start": os.getloadavg()}
    for kind in ("ours", "onnx2tf"):
        print(f"exporting: {kind} ...", file=sys.stderr)
        res[kind] = run_child(kind, work, args)
    images, labels, eval_src = load_eval_images(args.eval_images, split="test")
    res["eval"], res["eval_images"] = eval_src, len(images)
    codes = input_codes(images)
    xn = ((images.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32))
    qm = load(work / "ours.qm")
    sim = simulate(qm, images)
    t_in = qm.tensors[qm.input]
    x_real = ((codes.astype(np.float32) - t_in.zero_point[0]) * t_in.scale[0]).astype(np.float32)
    with torch.no_grad():
        flt = model.eval()(torch.from_numpy(xn).permute(0, 3, 1, 2)).argmax(1).numpy()
    res["accuracy_float_torch"] = float((flt == labels).mean())
    res["accuracy_sim"] = float((sim.argmax(1) == labels).mean())

    inputs = {}
    for kind in ("ours", "onnx2tf"):
        for prec in ("int8", "fp32"):
            key = f"{kind}_{prec}"
            m = Model(res[kind][prec], 1)
            if kind == "ours":
                x = codes if prec == "int8" else x_real
            else:
                x = quantize_input(m, xn) if m.inp["dtype"] == np.int8 else xn
            inputs[key] = x
            pred = m.run_all(x).argmax(1)
            res[key] = {"path": res[kind][prec], "size_bytes": Path(res[kind][prec]).stat().st_size,
                        "accuracy": float((pred == labels).mean()),
                        "top1_agreement_with_sim": float((pred == sim.argmax(1)).mean()),
                        "io": [str(np.dtype(m.inp["dtype"])), str(np.dtype(m.out["dtype"]))],
                        "ops": op_histogram(res[kind][prec])}
    paths = {k: res[k]["path"] for k in inputs}
    for threads in (1, 2):
        lat = latencies(paths, threads, {k: v[0] for k, v in inputs.items()}, args.rounds, args.per_round)
        for k, v in lat.items():
            res[k][f"latency_ms_{threads}t"] = v
    res["load_avg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table(res))
    return 0


def table(r: dict) -> str:
    o, x = r["ours"], r["onnx2tf"]
    oi, xi, of = r["ours_int8"], r["onnx2tf_int8"], r["ours_fp32"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×"

    speedup = x["export_s"] / o["export_s"]
    lat1, lat2 = oi["latency_ms_1t"] / xi["latency_ms_1t"], oi["latency_ms_2t"] / xi["latency_ms_2t"]
    f1, f2 = of["latency_ms_1t"] / oi["latency_ms_1t"], of["latency_ms_2t"] / oi["latency_ms_2t"]
    rows = [
        "| | ours (QM → schema object API) | torch → ONNX → onnx2tf -oiqt | ratio |",
        "|---|---|---|---|",
        f"| export time (after imports) | {o['export_s']:.2f} s (calibration {o['calibrate_s']:.2f} s + write "
        f"{o['write_s'] * 1e3:.0f} ms) | {x['export_s']:.2f} s (ONNX {x['onnx_export_s']:.2f} s + onnx2tf "
        f"{x['convert_s']:.2f} s) | {speedup:.1f}× faster |",
        f"| process wall time incl. imports | {o['process_wall_s']:.1f} s | {x['process_wall_s']:.1f} s | "
        f"{x['process_wall_s'] / o['process_wall_s']:.1f}× |",
        f"| peak memory (process RSS) | {o['peak_rss_mb']:.0f} MB | {x['peak_rss_mb']:.0f} MB | "
        f"{ratio(o['peak_rss_mb'], x['peak_rss_mb'])} |",
        f"| int8 model size | {oi['size_bytes'] / 1024:.0f} KiB | {xi['size_bytes'] / 1024:.0f} KiB | "
        f"{ratio(oi['size_bytes'], xi['size_bytes'])} |",
        f"| int8 latency, LiteRT XNNPACK, 1 thread | {oi['latency_ms_1t']:.3f} ms | {xi['latency_ms_1t']:.3f} ms | "
        f"{lat1:.2f}× |",
        f"| int8 latency, 2 threads | {oi['latency_ms_2t']:.3f} ms | {xi['latency_ms_2t']:.3f} ms | {lat2:.2f}× |",
        f"| top-1 agreement with our sim ({r['eval_images']} test images) | {100 * oi['top1_agreement_with_sim']:.2f} %"
        f" | {100 * xi['top1_agreement_with_sim']:.2f} % | |",
        f"| accuracy int8 (float torch {100 * r['accuracy_float_torch']:.2f} %, sim {100 * r['accuracy_sim']:.2f} %)"
        f" | {100 * oi['accuracy']:.2f} % | {100 * xi['accuracy']:.2f} % | |",
        f"| int8 ops | {fmt_ops(oi['ops'])} | {fmt_ops(xi['ops'])} | |",
        "",
        "| our artifacts | int8 | fp32 twin | fp32 / int8 |",
        "|---|---|---|---|",
        f"| latency, 1 thread | {oi['latency_ms_1t']:.3f} ms | {of['latency_ms_1t']:.3f} ms | {f1:.2f}× |",
        f"| latency, 2 threads | {oi['latency_ms_2t']:.3f} ms | {of['latency_ms_2t']:.3f} ms | {f2:.2f}× |",
        f"| size | {oi['size_bytes'] / 1024:.0f} KiB | {of['size_bytes'] / 1024:.0f} KiB | |",
        f"| accuracy | {100 * oi['accuracy']:.2f} % | {100 * of['accuracy']:.2f} % | |",
        "",
        f"Goals: export ≥ 5× faster: {'met' if speedup >= 5 else 'MISSED'} ({speedup:.1f}×); int8 latency ≤ 1.0× "
        f"onnx2tf's: {'met' if max(lat1, lat2) <= 1.0 else 'MISSED'} ({lat1:.2f}× / {lat2:.2f}×); int8 ≥ 2× faster "
        f"than fp32: {'met' if min(f1, f2) >= 2 else 'MISSED'} ({f1:.2f}× / {f2:.2f}×). Load average "
        f"{r['load_avg_start'][0]:.1f} → {r['load_avg_end'][0]:.1f}.",
    ]
    return "\n".join(rows)


def fmt_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(main())
