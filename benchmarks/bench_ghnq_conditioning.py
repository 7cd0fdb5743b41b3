"""Which bit-width conditioning should GHN-Q use for a weight width it was not trained on?

    .venv/bin/python benchmarks/bench_ghnq_conditioning.py --heldout 20 [--checkpoint runs/ghnq-25649.pt]

GHN-Q is conditioned on float / 8 / 4 / 2, while the exporters also offer 6-bit weights. For each of the first N
held-out cifar specs, the weights predicted with the 8-bit and with the 4-bit conditioning are evaluated at
W6A8, W8A8 and W4A8 (the train loop's quantization, BN statistics and activation ranges fixed on calibration
images as calibration fixes them; `ghnq.evaluate.top1_predicted`). Prints one JSON line per spec, then the
means and the paired W6A8 difference (8-bit minus 4-bit conditioning) with its standard error.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ghnq.data import load_eval_images
from ghnq.evaluate import calibration_uint8, heldout_specs, to_x01, top1_predicted
from ghnq.fakequant import FakeQuantNet
from ghnq.predict import load_checkpoint, predict_params
from ghnq.spec import build_model

CONDITIONINGS = ("8", "4")
WIDTHS = (6, 8, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", type=int, default=20, help="the first N held-out cifar specs (20)")
    ap.add_argument("--images", type=int, default=1000, help="test images (1000)")
    ap.add_argument("--bn-images", type=int, default=500, help="calibration images for BN and ranges (500)")
    ap.add_argument("--checkpoint", default=None, help="GHN-Q checkpoint (default: the shipped one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ghn = load_checkpoint(args.checkpoint)
    images, labels, _ = load_eval_images(args.images, quiet=True)
    test, y = to_x01(images), torch.as_tensor(labels)
    calib = to_x01(calibration_uint8(args.bn_images))
    rows = []
    for spec in heldout_specs(args.heldout):
        model = build_model(spec)
        net = FakeQuantNet(model)
        row = {"spec": spec["name"]}
        for cond in CONDITIONINGS:
            params = predict_params(ghn, model, bits=cond)
            for w in WIDTHS:
                row[f"cond{cond}_w{w}"] = round(100 * top1_predicted(net, params, w, 8, calib, test, y), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"# {len(rows)} specs, {len(test)} test images, step {ghn.meta.get('step', '?')}")
    for key in rows[0]:
        if key != "spec":
            print(f"# mean {key}: {statistics.mean(r[key] for r in rows):.2f} %")
    diff = [r["cond8_w6"] - r["cond4_w6"] for r in rows]
    se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
    print(f"# W6A8, 8-bit minus 4-bit conditioning: {statistics.mean(diff):+.2f} ± {se:.2f} pt "
          f"({sum(d > 0 for d in diff)} wins, {sum(d < 0 for d in diff)} losses)")


if __name__ == "__main__":
    main()
