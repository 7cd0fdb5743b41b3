"""python -m calibration --arch spec.yaml [--weights W] --method minmax --bits 8 -o model.qm

Builds the spec's model, fills its float weights (`ghnq.weights.obtain_weights`: --weights, else the shipped
GHN-Q checkpoint, else a seeded random init with a warning), optionally re-estimates BN statistics, calibrates
on real CIFAR-10 training images (the embedded test sample when no data root exists) and writes one
QuantizedModel file atomically. Prints the W-bit/A-bit simulated top-1 on test images when --eval-images > 0.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from calibration import calibrate, save, simulate
from calibration.observers import METHODS
from calibration.qmodel import WEIGHT_BITS
from ghnq.cli import UserError, run_cli
from ghnq.data import fit_images, load_eval_images
from ghnq.spec import build_model, load_spec, spec_name
from ghnq.train import evaluate
from ghnq.weights import obtain_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration", description="Calibrate a float model into one "
                                "QuantizedModel (.qm): every scale and zero point, int8 weights, int32 biases.")
    p.add_argument("--arch", required=True, help="spec.yaml")
    p.add_argument("--weights", default=None, help="float state_dict / trainer checkpoint (default: GHN-Q "
                   "prediction when shipped, else a seeded random init)")
    p.add_argument("--method", default="minmax", help=f"activation observer: {', '.join(METHODS)}")
    p.add_argument("--bits", type=int, default=8, help=f"weight bits: {', '.join(map(str, WEIGHT_BITS))}")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits: 8, or 4 (simulation only)")
    p.add_argument("--images", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--data-root", default=None, help="CIFAR-10 JPEG root (default $GHNQ_DATA_ROOT or "
                   "../shared/data/cifar10-jpeg; the embedded sample when absent)")
    p.add_argument("--bn-recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BN statistics on the calibration images before folding (default: when "
                   "they are placeholders, mean 0 / variance 1, as with predicted or random weights)")
    p.add_argument("--eval-images", type=int, default=0, help="report float and simulated top-1 on this many "
                   "test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init fallback")
    p.add_argument("-o", "--out", required=True, help="output .qm file")
    a = p.parse_args(argv)
    if a.method not in METHODS:
        raise UserError(f"--method: got {a.method!r}; allowed: {', '.join(METHODS)}")
    if a.bits not in WEIGHT_BITS:
        raise UserError(f"--bits: got {a.bits}; allowed: {', '.join(map(str, WEIGHT_BITS))}")
    if a.act_bits not in (8, 4):
        raise UserError(f"--act-bits: got {a.act_bits}; allowed: 8, 4")
    if a.images < 1:
        raise UserError(f"--images: got {a.images}; the calibration set needs at least 1 image")
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    spec = load_spec(a.arch)
    model = build_model(spec)
    source = obtain_weights(model, a.weights, bits=a.bits, seed=a.seed)
    images, _, img_source = load_eval_images(a.images, root=a.data_root, split="train")
    images = fit_images(images, spec["input"], f"{a.arch}: input")
    qm = calibrate(model, images, method=a.method, weight_bits=a.bits, act_bits=a.act_bits,
                   bn_recalibrate=a.bn_recalibrate,
                   meta={"name": spec_name(spec), "weights": source, "calibration_source": img_source,
                         "arch": str(a.arch)})
    if a.eval_images > 0:
        test, labels, _ = load_eval_images(a.eval_images, root=a.data_root)
        test = fit_images(test, spec["input"], f"{a.arch}: input")
        fa = evaluate(model, test, labels)
        qa = float((simulate(qm, test).argmax(1) == labels).mean())
        qm.meta.update({"float_top1": fa, "sim_top1": qa, "eval_images": len(test)})
        print(f"top-1 on {len(test)} test images: float {fa:.4f}  W{a.bits}A{a.act_bits} sim {qa:.4f}")
    save(qm, a.out)
    n_w = sum(int(np.prod(t.shape)) for t in qm.tensors.values() if t.is_const and t.dtype == "int8")
    print(f"wrote {a.out}: {len(qm.ops)} ops, {n_w:,} int8 weights, method={a.method}, W{a.bits}A{a.act_bits}, "
          f"{len(images)} calibration images, weights: {source}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
