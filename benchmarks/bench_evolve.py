"""Benchmark for issue 11: 4-bit ResNet-20 on CIFAR-10 by evolutionary cooperative coevolution (ghnq.evolve)
vs post-training quantization and vs straight-through-estimator QAT at the same number of forward passes.

    W=runs/resnet20-sgd/weights.pt; OUT=runs/bench-evolve
    python benchmarks/bench_evolve.py float  --weights $W --out $OUT          # float top-1 (10,000 test images)
    python benchmarks/bench_evolve.py ea     --weights $W --out $OUT --budget-evals 1200 [evolve flags...]
    python benchmarks/bench_evolve.py qat    --weights $W --out $OUT --image-forwards N   # N: from ea.json
    python benchmarks/bench_evolve.py score  --out $OUT --qm $OUT/ea/start.qm --name ptq_score   # 10k in the sim
    python benchmarks/bench_evolve.py score  --out $OUT --qm $OUT/ea/resnet20.qm --name ea_score
    python benchmarks/bench_evolve.py report --out $OUT                      # table (markdown) + PNG

Stages are separate processes so they can run side by side on a shared CPU; each writes OUT/<stage>.json.
`ea` runs the real CLI (`python -m ghnq.evolve`, 4 bits, --init ptq) and reads its history.json: the PTQ
start and the evolved model are both scored on the 10,000 test images in the sim. `qat` fine-tunes the same
float weights with per-channel 4-bit STE fake-quant weights (ghnq.fakequant.fq_weight; BN in training
mode; activations not fake-quantized, they are int8 in the end), for as many image forward passes as the
EA used, then calibrates with the same 512 calibration images and scores the QuantizedModel in the same sim.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration import calibrate  # noqa: E402
from ghnq.data import load_cifar10, load_eval_images, to_float  # noqa: E402
from ghnq.evolve import top1  # noqa: E402
from ghnq.fakequant import fq_weight  # noqa: E402
from ghnq.fileio import atomic_write_text  # noqa: E402
from ghnq.spec import build_model, load_spec  # noqa: E402
from ghnq.train import load_weights  # noqa: E402

SPEC = ROOT / "specs" / "resnet20.yaml"
BITS = 4


def write(out: Path, stage: str, result: dict) -> None:
    atomic_write_text(out / f"{stage}.json", json.dumps(result, indent=1))
    print(json.dumps(result))


def train_subset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training images in the order ghnq.evolve uses (its calibration set is the first 512)."""
    images, labels = load_cifar10("train", progress=False)
    order = np.random.default_rng(seed).permutation(len(labels))
    return images[order], labels[order]


def stage_float(args: argparse.Namespace) -> None:
    model = build_model(load_spec(SPEC))
    load_weights(model, args.weights)
    model.eval()
    images, labels, src = load_eval_images(args.test_images)
    t0 = time.time()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(labels), 250):
            hits += int((model(to_float(images[i:i + 250])).argmax(1).numpy() == labels[i:i + 250]).sum())
    write(args.out, "float", {"top1": hits / len(labels), "test_images": len(labels), "source": src,
                              "eval_s": round(time.time() - t0, 1)})


def stage_ea(args: argparse.Namespace, extra: list[str]) -> None:
    run = args.out / "ea"
    cmd = [sys.executable, "-m", "ghnq.evolve", "--arch", str(SPEC), "--bits", str(BITS), "--init", "ptq",
           "--weights", str(args.weights), "--budget-evals", str(args.budget_evals), "--out", str(run),
           "--eval-images", str(args.test_images), "--curve-images", str(args.curve_images), "--threads", "1",
           *(["--resume"] if (run / "evolve-state.pt").exists() else []), *extra]
    print(" ".join(cmd), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    h = json.loads((run / "history.json").read_text())
    r = h["report"]
    write(args.out, "ea", {"command": " ".join(cmd[1:]), "process_s": round(time.time() - t0, 1), **r,
                           "curve": [{k: e.get(k) for k in ("evals", "image_forwards", "wall_s", "monitor_loss",
                                                            "monitor_acc", "test_acc", "changed_weights")}
                                     for e in h["history"]]})


def stage_score(args: argparse.Namespace) -> None:
    """Top-1 of a .qm on the test images in the sim's exact TFLite mode (e.g. the EA's start.qm and result)."""
    from calibration.qmodel import load as load_qm

    images, labels, src = load_eval_images(args.test_images)
    images, labels = images[args.offset:args.offset + args.count], labels[args.offset:args.offset + args.count]
    t0 = time.time()
    acc = top1(load_qm(args.qm), images, labels)
    write(args.out, args.name, {"qm": str(args.qm), "top1": acc, "test_images": len(labels), "source": src,
                                "offset": args.offset, "eval_s": round(time.time() - t0, 1)})


class STE(nn.Module):
    """Weight parametrization: per-output-channel symmetric fake-quant with a straight-through gradient."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fq_weight(w, self.bits)


def stage_qat(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(load_spec(SPEC))
    load_weights(model, args.weights)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for m in layers:
        parametrize.register_parametrization(m, "weight", STE(BITS))
    images, labels = train_subset()
    calib = images[:512]
    test_x, test_y, _ = load_eval_images(args.test_images)
    steps = max(1, args.image_forwards // args.qat_batch)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    marks = {int(steps * f) for f in (0.25, 0.5, 0.75)} | {steps}
    curve, t0, train_s = [], time.time(), 0.0

    def quantized() -> object:
        m2 = build_model(load_spec(SPEC))
        state = {k.replace("parametrizations.weight.original", "weight"): v for k, v in model.state_dict().items()}
        m2.load_state_dict(state)
        return calibrate(m2.eval(), calib, weight_bits=BITS, progress=False)

    from tqdm import tqdm

    pos = 0
    for step in tqdm(range(1, steps + 1), desc="STE-QAT", unit="step"):
        if pos + args.qat_batch > len(labels):
            pos = 0
        x, y = to_float(images[pos:pos + args.qat_batch]), torch.from_numpy(labels[pos:pos + args.qat_batch]).long()
        pos += args.qat_batch
        model.train()
        ts = time.time()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        train_s += time.time() - ts
        if step in marks and step != steps and args.curve_images:
            acc = top1(quantized(), test_x[:args.curve_images], test_y[:args.curve_images])
            curve.append({"step": step, "image_forwards": step * args.qat_batch, "train_s": round(train_s, 1),
                          "test_acc": acc})
    qm = quantized()
    ts = time.time()
    acc = top1(qm, test_x, test_y)
    if args.curve_images:
        curve.append({"step": steps, "image_forwards": steps * args.qat_batch, "train_s": round(train_s, 1),
                      "test_acc": top1(qm, test_x[:args.curve_images], test_y[:args.curve_images])})
    write(args.out, "qat", {"top1": acc, "test_images": len(test_y), "steps": steps, "batch": args.qat_batch,
                            "image_forwards": steps * args.qat_batch, "backward_passes": steps * args.qat_batch,
                            "lr": args.lr, "train_s": round(train_s, 1), "eval_s": round(time.time() - ts, 1),
                            "process_s": round(time.time() - t0, 1), "curve": curve})


def stage_report(args: argparse.Namespace) -> None:
    def get(name: str) -> dict:
        p = args.out / f"{name}.json"
        if p.exists():
            return json.loads(p.read_text())
        parts = [json.loads(q.read_text()) for q in sorted(args.out.glob(f"{name}.part*.json"))]
        if not parts:  # a scoring split over processes (score --offset/--count): merge the parts
            return {}
        n = sum(q["test_images"] for q in parts)
        return {"top1": sum(q["top1"] * q["test_images"] for q in parts) / n, "test_images": n,
                "eval_s": max(q["eval_s"] for q in parts)}

    fl, ea, qat = get("float"), get("ea"), get("qat")
    for key, name in (("start_test_top1", "ptq_score"), ("final_test_top1", "ea_score")):
        if get(name) and ea:  # scored in separate processes (side by side with QAT on a shared CPU)
            ea[key], ea["test_images"] = get(name)["top1"], get(name)["test_images"]
    rows = ["| model (ResNet-20, CIFAR-10) | top-1, 10,000 test images | wall time | image forward passes "
            "| backward passes |", "|---|---|---|---|---|"]
    pct = (lambda v: f"{100 * v:.2f} %" if v is not None else "n/a")
    if fl:
        rows.append(f"| float (SGD) | {pct(fl['top1'])} | (trained by the lead) | – | – |")
    if ea:
        rows.append(f"| 4-bit PTQ (EA start) | {pct(ea.get('start_test_top1'))} | calibration only | 512 | 0 |")
        rows.append(f"| 4-bit EA-CC | {pct(ea.get('final_test_top1'))} | {ea['wall_s']:.0f} s search | "
                    f"{ea['image_forwards']:,} ({ea['evals']:,} evals × batch) | 0 |")
    if qat:
        rows.append(f"| 4-bit STE-QAT | {pct(qat['top1'])} | {qat['train_s']:.0f} s training | "
                    f"{qat['image_forwards']:,} | {qat['backward_passes']:,} |")
    table = "\n".join(rows)
    atomic_write_text(args.out / "table.md", table + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if ea and ea.get("curve") and ea["curve"][0].get("test_acc") is not None:
        xs = [c["image_forwards"] for c in ea["curve"]]
        ax.plot(xs, [100 * c["test_acc"] for c in ea["curve"]], "o-", label="EA-CC (test subset)")
        ax.plot(xs, [100 * c["monitor_acc"] for c in ea["curve"]], ".:", label="EA-CC (train monitor set)")
    if qat and qat.get("curve"):
        ax.plot([c["image_forwards"] for c in qat["curve"]], [100 * c["test_acc"] for c in qat["curve"]], "s-",
                label="STE-QAT (test subset)")
    if ea and ea.get("final_test_top1") is not None:
        ax.plot([ea["image_forwards"]], [100 * ea["final_test_top1"]], "*", ms=14, color="C0",
                label="EA-CC final, 10k test")
    if qat and qat.get("top1") is not None:
        ax.plot([qat["image_forwards"]], [100 * qat["top1"]], "*", ms=14, color="C2", label="STE-QAT final, 10k test")
    if fl:
        ax.axhline(100 * fl["top1"], color="k", ls="--", lw=1, label="float (SGD), 10k test")
    if ea and ea.get("start_test_top1") is not None:
        ax.axhline(100 * ea["start_test_top1"], color="gray", ls=":", lw=1, label="4-bit PTQ start, 10k test")
    ax.set_xlabel("image forward passes")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("4-bit ResNet-20 / CIFAR-10: accuracy vs evaluations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_evals.png", dpi=120)
    print(f"wrote {args.out / 'accuracy_vs_evals.png'}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("float", "ea", "qat", "score", "report"))
    p.add_argument("--qm", type=Path, help="score: the .qm to score")
    p.add_argument("--name", default="score", help="score: result name (OUT/NAME.json)")
    p.add_argument("--offset", type=int, default=0, help="score: first test image (split a scoring over processes)")
    p.add_argument("--count", type=int, default=10000, help="score: number of test images from --offset")
    p.add_argument("--weights", type=Path, default=ROOT / "runs" / "resnet20-sgd" / "weights.pt")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-evolve")
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--curve-images", type=int, default=500)
    p.add_argument("--budget-evals", type=int, default=1200)
    p.add_argument("--image-forwards", type=int, default=0, help="qat: forward-pass budget (default: ea.json's)")
    p.add_argument("--qat-batch", type=int, default=128, help="qat batch size")
    p.add_argument("--lr", type=float, default=0.01, help="qat learning rate (cosine to 0)")
    args, extra = p.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("float", "ea", "qat") and not args.weights.is_file():
        sys.exit(f"error: {args.weights}: no float weights (train them with python -m ghnq.train)")
    if args.stage == "qat" and not args.image_forwards:
        ea = args.out / "ea.json"
        if not ea.exists():
            sys.exit("error: qat needs --image-forwards N or a finished ea stage (ea.json)")
        args.image_forwards = json.loads(ea.read_text())["image_forwards"]
    {"float": lambda: stage_float(args), "ea": lambda: stage_ea(args, extra), "qat": lambda: stage_qat(args),
     "score": lambda: stage_score(args), "report": lambda: stage_report(args)}[args.stage]()


if __name__ == "__main__":
    main()
