"""Is the quantization GHN-Q trains with the one the exported integer graph has? (issue 6, item 4)

    python -m benchmarks.bench_honest_quant --heldout 5 --images 2000 --json runs/honest-quant.json

For each held-out sampled spec (GHN-Q never trained on them) and weight bit width (W8A8, W4A8), with the
shipped checkpoint's prediction and BN statistics re-estimated on --bn-images training images, three top-1
figures on the same test images:
  train-loop   ghnq/fakequant.py, the quantization inside meta-training (BN folded before weight
               fake-quant, static activation ranges observed on the calibration images)
  sim          calibration.calibrate + calibration.simulate (rounding="xnnpack"): the QuantizedModel
  .tflite      export.tflite's artifact of that QuantizedModel, run by the LiteRT interpreter with its
               default XNNPACK delegate (what a device runs), one image at a time
and the logit codes of sim vs .tflite (they must be equal: the sim has the delegate's arithmetic), and how
often the train-loop's class equals the .tflite's image by image.
The goal (issue 6): train-loop top-1 within 0.2 pt of the .tflite's. Prints a markdown table; --json
writes every number atomically.
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

from calibration import calibrate  # noqa: E402
from calibration.qmodel import input_codes  # noqa: E402
from calibration.sim import Simulator  # noqa: E402
from export.tflite import LiteRTRunner, build_tflite  # noqa: E402
from ghnq.cli import UserError, run_cli  # noqa: E402
from ghnq.data import load_eval_images  # noqa: E402
from ghnq.evaluate import calibration_uint8, heldout_specs, load_predicted, logits_predicted, to_x01  # noqa: E402
from ghnq.fakequant import FakeQuantNet  # noqa: E402
from ghnq.fileio import atomic_write_text  # noqa: E402
from ghnq.predict import load_checkpoint, predict_params  # noqa: E402
from ghnq.spec import build_model, load_spec  # noqa: E402

GOAL_PT = 0.2


def measure(spec: dict, ghn, wbits: int, calib_u8: np.ndarray, test_u8: np.ndarray, labels: np.ndarray) -> dict:
    model = build_model(spec)
    params = predict_params(ghn, model, bits=str(wbits))
    t0 = time.perf_counter()
    loop_logits = logits_predicted(FakeQuantNet(model), params, wbits, 8, to_x01(calib_u8), to_x01(test_u8)).numpy()
    loop = loop_logits.argmax(1)
    t1 = time.perf_counter()
    load_predicted(model, params)
    qm = calibrate(model, calib_u8, weight_bits=wbits, act_bits=8, bn_recalibrate=True, progress=False)
    sim_codes = Simulator(qm, rounding="xnnpack").run(test_u8)
    t2 = time.perf_counter()
    tfl_codes = LiteRTRunner(build_tflite(qm), kernels="xnnpack")(input_codes(test_u8))
    t3 = time.perf_counter()
    top = {"train_loop": float((loop == labels).mean()), "sim": float((sim_codes.argmax(1) == labels).mean()),
           "tflite": float((tfl_codes.argmax(1) == labels).mean())}
    diff = np.abs(sim_codes.astype(np.int16) - tfl_codes.astype(np.int16))
    # The train loop's float logits put on the integer graph's output grid: how far apart, in int8 steps.
    scale, zp = qm.output_qparams()
    loop_codes = np.clip(np.round(loop_logits / scale) + zp, -128, 127)
    loop_steps = np.abs(loop_codes - tfl_codes.astype(np.int16))
    margin = np.sort(tfl_codes.astype(np.int16), axis=1)
    return {"spec": spec.get("name", "?"), "wbits": wbits, "top1": top,
            "train_loop_minus_tflite_pt": round(100 * (top["train_loop"] - top["tflite"]), 2),
            "sim_minus_tflite_pt": round(100 * (top["sim"] - top["tflite"]), 2),
            "train_loop_vs_tflite_same_class": float((loop == tfl_codes.argmax(1)).mean()),
            "train_loop_vs_tflite_logits_within_1_step": float((loop_steps <= 1).mean()),
            "train_loop_vs_tflite_mean_steps": round(float(loop_steps.mean()), 3),
            "tflite_top2_margin_median_steps": float(np.median(margin[:, -1] - margin[:, -2])),
            "sim_vs_tflite_codes_differ": int((diff > 0).sum()), "sim_vs_tflite_max_step": int(diff.max()),
            "codes": int(diff.size), "seconds": {"train_loop": round(t1 - t0, 1), "calibrate_sim": round(t2 - t1, 1),
                                                 "tflite": round(t3 - t2, 1)}}


def markdown(rows: list[dict]) -> str:
    lines = ["| spec | weights | train-loop top-1 % | sim top-1 % | .tflite top-1 % | train-loop − .tflite (pt) | "
             "same class, train-loop vs .tflite | train-loop logits within 1 step of .tflite (mean steps) | "
             ".tflite top-2 margin, median steps | sim vs .tflite codes differing |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["top1"]
        lines.append(f"| {r['spec']} | W{r['wbits']}A8 | {100 * t['train_loop']:.2f} | {100 * t['sim']:.2f} | "
                     f"{100 * t['tflite']:.2f} | {r['train_loop_minus_tflite_pt']:+.2f} | "
                     f"{r['train_loop_vs_tflite_same_class']:.1%} | "
                     f"{r['train_loop_vs_tflite_logits_within_1_step']:.1%} "
                     f"({r['train_loop_vs_tflite_mean_steps']:.2f}) | "
                     f"{r['tflite_top2_margin_median_steps']:.0f} | "
                     f"{r['sim_vs_tflite_codes_differ']:,} / {r['codes']:,} |")
    gaps = [abs(r["train_loop_minus_tflite_pt"]) for r in rows]
    if gaps:
        within = sum(g <= GOAL_PT for g in gaps)
        lines += ["", f"|train-loop − .tflite|: mean {np.mean(gaps):.2f} pt, max {max(gaps):.2f} pt; "
                      f"{within} of {len(gaps)} within the {GOAL_PT} pt goal"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_honest_quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heldout", type=int, default=5, help="the first N held-out sampled specs")
    p.add_argument("--arch", nargs="*", default=[], help="also these spec.yaml files")
    p.add_argument("--bits", default="8,4", help="weight bit widths (activations 8)")
    p.add_argument("--images", type=int, default=2000, help="test images (fixed class-interleaved subset)")
    p.add_argument("--bn-images", type=int, default=512, help="training images: BN statistics and ranges")
    p.add_argument("--checkpoint", default=None, help="GHN-Q checkpoint (default: the shipped one)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    wbits = []
    for b in a.bits.split(","):
        if b.strip() not in ("8", "4", "2"):
            raise UserError(f"--bits: got {b!r}; allowed: a comma list of 8, 4, 2")
        wbits.append(int(b))
    specs = [load_spec(f) for f in a.arch] + heldout_specs(a.heldout)
    if not specs:
        raise UserError("nothing to measure: --heldout N and/or --arch SPEC...")
    torch.set_num_threads(a.threads)
    ghn = load_checkpoint(a.checkpoint)
    test, labels, source = load_eval_images(a.images, a.data_root, quiet=True)
    calib = calibration_uint8(a.bn_images, a.data_root)
    rows = []
    for i, spec in enumerate(specs, 1):
        for wb in wbits:
            r = measure(spec, ghn, wb, calib, test, labels)
            rows.append(r)
            print(f"[{i}/{len(specs)}] {r['spec']} W{wb}A8: train-loop {100 * r['top1']['train_loop']:.2f} %, "
                  f"sim {100 * r['top1']['sim']:.2f} %, .tflite {100 * r['top1']['tflite']:.2f} % "
                  f"(codes differing sim vs .tflite: {r['sim_vs_tflite_codes_differ']})", file=sys.stderr, flush=True)
            if a.json:
                atomic_write_text(Path(a.json), json.dumps({"test_images": len(labels), "test_source": source,
                                                            "bn_images": len(calib), "rows": rows}, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    run_cli(main)
