"""Benchmark: LiteRT + XNNPACK delegate vs simulate(rounding="xnnpack") vs simulate(rounding="tflite").

    python -m benchmarks.bench_xnnpack_rounding --arch specs/resnet20.yaml [--weights W.pt] [--images 1000]

One calibration (the export pipeline's: 512 real training images, minmax, BN re-estimated only for predicted /
random weights) → one QuantizedModel → our int8 `.tflite` (export.tflite.build_tflite), run in LiteRT with its
default XNNPACK delegate on N real CIFAR-10 test images. Reported:
  * end to end: differing int8 logit codes (and top-1 agreement, max step) of the delegate vs each sim;
  * per op: every op alone in the delegate (a one-op `.tflite`), fed a sim's own input codes for that op on the
    first `--per-op-images` images, against that sim's output codes (differing codes per op kind).
It is the script behind the BENCHMARKS.md claim "xnnpack sim == LiteRT XNNPACK delegate, 0 differing codes".
Prints a markdown summary and writes OUT/results.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROUNDINGS = ("xnnpack", "tflite")


def end_to_end(out: np.ndarray, sims: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    res = {}
    for name, sim in sims.items():
        d = np.abs(out.astype(np.int32) - sim.astype(np.int32))
        res[name] = {"differing_codes": int((d > 0).sum()), "codes": int(d.size), "max_step": int(d.max()),
                     "top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean())}
    return res


def per_op(qm: Any, images: np.ndarray, rounding: str) -> dict[str, list[int]]:
    """op kind → [differing codes, codes]: each op alone under the delegate on the sim's inputs for it."""
    from calibration.sim import simulate
    from export.tflite import LiteRTRunner, build_tflite

    _, env = simulate(qm, images, capture=True, rounding=rounding)
    diff: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for op in qm.ops:
        got = LiteRTRunner(build_tflite(qm, ops=[op]), "xnnpack").run_named(env)
        want = env[op.outputs[0]].reshape(got.shape)
        diff[op.kind][0] += int((got != want).sum())
        diff[op.kind][1] += int(got.size)
    return dict(sorted(diff.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, help="spec.yaml")
    p.add_argument("--weights", help="float weights (state_dict or ghnq.train checkpoint); default: as the exporters "
                   "(shipped GHN-Q prediction, else seeded random)")
    p.add_argument("--images", type=int, default=1000, help="real test images, end to end (1000)")
    p.add_argument("--per-op-images", type=int, default=20, help="of those, images for the per-op runs (20; 0 = skip)")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--data-root", help="CIFAR-10 JPEG root (default: as the exporters)")
    p.add_argument("--out", default="out/bench-xnnpack-rounding", help="folder for results.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.images < 1 or args.per_op_images < 0 or args.calib_images < 1:
        p.error("--images and --calib-images must be ≥ 1, --per-op-images ≥ 0")
    if args.weights is not None and not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file")
    torch.set_num_threads(args.threads)

    from calibration import calibrate
    from calibration.qmodel import input_codes
    from calibration.sim import simulate
    from export.tflite import LiteRTRunner, build_tflite
    from ghnq.data import load_eval_images
    from ghnq.fileio import atomic_write_text
    from ghnq.spec import build_model, load_spec, spec_name
    from ghnq.weights import obtain_weights

    t0 = time.perf_counter()
    spec = load_spec(args.arch)
    model = build_model(spec)
    weights = obtain_weights(model, args.weights, quiet=True)
    calib, _, calib_source = load_eval_images(args.calib_images, args.data_root, split="train", quiet=True)
    qm = calibrate(model, calib, bn_recalibrate=args.weights is None, progress=False, meta={"name": spec_name(spec)})
    images, labels, source = load_eval_images(args.images, args.data_root, split="test", quiet=True)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = LiteRTRunner(build_tflite(qm), "xnnpack", args.threads)(input_codes(images))
    t_rt = time.perf_counter() - t0
    t0 = time.perf_counter()
    sims = {r: simulate(qm, images, rounding=r) for r in ROUNDINGS}
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    ops = {r: per_op(qm, images[:args.per_op_images], r) for r in ROUNDINGS} if args.per_op_images else {}
    t_op = time.perf_counter() - t0
    res = {"arch": args.arch, "weights": weights, "calibration_source": calib_source, "images": len(images),
           "verify_source": source, "per_op_images": args.per_op_images, "end_to_end": end_to_end(out, sims),
           "accuracy": {"litert_xnnpack": float((out.argmax(1) == labels).mean()),
                        **{f"sim_{r}": float((s.argmax(1) == labels).mean()) for r, s in sims.items()}},
           "per_op": ops, "load_average": os.getloadavg(),
           "seconds": {"calibration": round(t_cal, 1), "litert": round(t_rt, 1), "sims": round(t_sim, 1),
                       "per_op": round(t_op, 1)}}
    path = atomic_write_text(Path(args.out) / "results.json", json.dumps(res, indent=1) + "\n")
    print(f"{spec_name(spec)}, weights: {weights}; {len(images)} images ({source})")
    print("| LiteRT + XNNPACK delegate vs | differing logit codes | max step | top-1 agreement |")
    print("|---|---|---|---|")
    for r, e in res["end_to_end"].items():
        print(f"| sim rounding={r} | {e['differing_codes']:,} of {e['codes']:,} | {e['max_step']} | "
              f"{100 * e['top1_agreement']:.2f} % |")
    for r, kinds in ops.items():
        print(f"per op vs sim rounding={r} ({args.per_op_images} images): "
              + "; ".join(f"{k} {d:,} / {n:,}" for k, (d, n) in kinds.items()))
    print(f"accuracy: {res['accuracy']}; seconds: {res['seconds']}; load average {res['load_average']}\n{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
