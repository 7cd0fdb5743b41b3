"""Calibration benchmark: float → W8A8 drop per observer, W4A8, and sim vs integer-reference parity.

    python benchmarks/bench_calibration.py --arch specs/resnet20.yaml --weights runs/resnet20/weights.pt \
        --images 10000 --parity-images 10000 --json out.json

Calibration images come from the CIFAR-10 training split (never the evaluation images); evaluation on the
first --images test images (class-interleaved). Prints one markdown table row per configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import calibrate, reference  # noqa: E402
from calibration.compare import compare  # noqa: E402
from calibration.convert import float_graph, fold_input_normalization  # noqa: E402
from calibration.observers import METHODS  # noqa: E402
from calibration.sim import Simulator, run_ops  # noqa: E402
from ghnq.data import load_eval_images  # noqa: E402
from ghnq.spec import build_model, load_spec, spec_name  # noqa: E402
from ghnq.train import evaluate, load_weights  # noqa: E402


def folded_float_top1(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of the float graph the QM quantizes (BN folded, normalization folded into the first conv)."""
    g = float_graph(model, [3, images.shape[1], images.shape[2]])
    fold_input_normalization(g)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x = (torch.from_numpy(images[i:i + 500]).permute(0, 3, 1, 2).float() - 128) / 255
            correct += int((run_ops(g.ops, g.input, x, g.params)[g.output].argmax(1).numpy()
                            == labels[i:i + 500]).sum())
    return correct / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--parity-images", type=int, default=10000)
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--w4-methods", default="minmax,mse", help="observers also run at W4A8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    spec = load_spec(a.arch)
    model = build_model(spec)
    load_weights(model, a.weights)
    model.eval()
    test, labels, src = load_eval_images(a.images)
    calib, _, calib_src = load_eval_images(a.calib_images, split="train")
    res: dict = {"arch": spec_name(spec), "weights": a.weights, "test_images": len(test), "test_source": src,
                 "calib_images": len(calib), "calib_source": calib_src, "rows": []}
    res["float_top1"] = evaluate(model, test, labels)
    res["folded_float_top1"] = folded_float_top1(model, test, labels)
    print(f"{res['arch']}: float top-1 {res['float_top1']:.4f} (folded graph {res['folded_float_top1']:.4f}) "
          f"on {len(test)} test images; calibration: {len(calib)} train images", flush=True)
    print("| net | config | observer | sim top-1 | drop vs float (pp) | calibrate s | sim s |")
    print("|---|---|---|---|---|---|---|")
    configs = [(8, m) for m in a.methods.split(",")] + [(4, m) for m in a.w4_methods.split(",") if m]
    for bits, method in configs:
        t0 = time.time()
        qm = calibrate(model, calib, method=method, weight_bits=bits, act_bits=8, progress=False)
        t1 = time.time()
        sim = Simulator(qm)
        codes = sim.run(test)
        t2 = time.time()
        top1 = float((codes.argmax(1) == labels).mean())
        row = {"weight_bits": bits, "act_bits": 8, "method": method, "sim_top1": top1,
               "drop_pp": 100 * (res["float_top1"] - top1), "calibrate_s": t1 - t0, "sim_s": t2 - t1}
        if bits == 8 and method == "minmax" and a.parity_images > 0:
            px = test[:a.parity_images]
            t3 = time.time()
            ref = reference.run(qm, px)
            row["reference_s"] = time.time() - t3
            c = compare(codes[:len(px)], ref)
            cf = compare(Simulator(qm, rounding="float").run(px), ref)
            row["parity"] = {"images": len(px), "top1_agreement": c.top1_agreement,
                             "logits_within_1": c.logits_within_1, "logits_max_abs": c.logits_max_abs,
                             "float_rounding_top1_agreement": cf.top1_agreement,
                             "float_rounding_logits_within_1": cf.logits_within_1,
                             "float_rounding_logits_max_abs": cf.logits_max_abs,
                             "reference_top1": float((ref.argmax(1) == labels[:len(px)]).mean())}
        res["rows"].append(row)
        print(f"| {res['arch']} | W{bits}A8 | {method} | {top1:.4f} | {row['drop_pp']:+.2f} | "
              f"{row['calibrate_s']:.1f} | {row['sim_s']:.1f} |", flush=True)
        if "parity" in row:
            pr = row["parity"]
            print(f"  parity on {pr['images']} images (W8A8 minmax): sim(tflite rounding) vs reference top-1 "
                  f"agreement {pr['top1_agreement']:.4%}, logits within 1 step {pr['logits_within_1']:.4%}, max "
                  f"{pr['logits_max_abs']}; textbook float-rounding sim: {pr['float_rounding_top1_agreement']:.4%}"
                  f", within 1 {pr['float_rounding_logits_within_1']:.4%}, max "
                  f"{pr['float_rounding_logits_max_abs']}; reference top-1 {pr['reference_top1']:.4f}; "
                  f"reference {row['reference_s']:.0f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
