"""Is the ranking worth trusting? Rank correlation of GHN-Q's predicted int8 top-1 with trained int8 top-1.

    python -m benchmarks.bench_rank_trust --specs 20 --epochs 3 --out out/rank-trust
    python -m benchmarks.bench_rank_trust --specs 20 --epochs 3 --device cuda      # the training part on a GPU

Specs: the first --specs held-out sampled specs (ghnq.meta_train.heldout_specs: never seen by GHN-Q's
meta-training), plus any --arch files. For each spec, on the same test and calibration images:
  predicted  ghnq.rank.predicted_accuracy: GHN-Q weights for 8 bits, BN re-estimated, calibrated, sim top-1 (W8A8)
  trained    python -m ghnq.train --epochs E (the SGD recipe, one short fixed schedule for every spec), then
             calibration.calibrate (post-training quantization of the trained weights) and the same sim (W8A8)
Then Kendall τ-b and Spearman ρ between the two columns, each with a two-sided permutation p-value, and
trust.json, trust.md and trust.png (the scatter) in --out. Resumable: a spec's result is cached in
OUT/<hash>/result.json; an interrupted training continues with ghnq.train --resume.
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
import yaml
from tqdm import tqdm

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Rank correlation (numpy; scipy is not part of the pinned stack)


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den else float("nan")


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """τ-b = (concordant − discordant) / sqrt((n0 − ties_x)(n0 − ties_y)) over all pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    iu = np.triu_indices(len(x), 1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    den = float(np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy)))
    return float((sx * sy).sum() / den) if den else float("nan")


def permutation_p(stat, x: np.ndarray, y: np.ndarray, n: int = 5000, seed: int = 0) -> float:
    """Two-sided p-value: how often a random pairing of x with y gives |stat| at least as large."""
    observed = abs(stat(x, y))
    if np.isnan(observed):  # a constant column: no ranking to test
        return float("nan")
    rng = np.random.default_rng(seed)
    hits = sum(abs(stat(x, rng.permutation(y))) >= observed - 1e-12 for _ in range(n))
    return (hits + 1) / (n + 1)


# ----------------------------------------------------------------------------------------------------
# One spec


def trained_int8_top1(spec: dict, folder: Path, args: argparse.Namespace, data) -> tuple[float, float, float]:
    """(int8 sim top-1, float top-1, training seconds) after the short SGD schedule (resumes a stopped run)."""
    from calibration import calibrate, simulate
    from export.verify import float_accuracy
    from ghnq.rank import top1
    from ghnq.spec import build_model
    from ghnq.train import load_weights

    spec_file = folder / "spec.yaml"
    atomic_write_text(spec_file, yaml.safe_dump(spec, sort_keys=False))
    run = folder / "train"
    if not (run / "weights.pt").is_file():
        cmd = [sys.executable, "-m", "ghnq.train", "--arch", str(spec_file), "--epochs", str(args.epochs),
               "--out", str(run), "--threads", str(args.threads), "--seed", str(args.seed), "--device", args.device]
        if args.train_images:
            cmd += ["--train-images", str(args.train_images)]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        if (run / "checkpoint.pt").is_file():
            cmd.append("--resume")
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
        if rc:
            raise UserError(f"ghnq.train failed (exit {rc}) for {spec_file}")
        (folder / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    seconds = float((folder / "train_seconds.txt").read_text()) if (folder / "train_seconds.txt").exists() else 0.0
    model = load_weights(build_model(spec), run / "weights.pt").eval()
    fl = float_accuracy(model, data.test, data.labels)
    qm = calibrate(model, data.calib, weight_bits=8, act_bits=8, bn_recalibrate=False, progress=False)
    return top1(simulate(qm, data.test), data.labels), fl, seconds


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    x = [100 * r["predicted_int8"] for r in rows]
    y = [100 * r["trained_int8"] for r in rows]
    ax.scatter(x, y, c="tab:blue")
    for r, a, b in zip(rows, x, y, strict=True):
        ax.annotate(r["name"], (a, b), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel("GHN-Q predicted int8 top-1, % (no training)")
    ax.set_ylabel("trained int8 top-1, % (SGD short schedule + PTQ)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_rank_trust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", type=int, default=20, help="held-out sampled specs (default 20)")
    p.add_argument("--arch", nargs="*", default=[], help="also these spec files")
    p.add_argument("--epochs", type=int, default=3, help="SGD epochs per spec (default 3)")
    p.add_argument("--train-images", type=int, default=0, help="train on the first N images only (default all)")
    p.add_argument("--images", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--out", default="out/rank-trust")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="training device")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.specs < 0 or args.epochs < 1 or args.images < 1 or args.calib_images < 1:
        raise UserError("--specs ≥ 0, --epochs, --images, --calib-images ≥ 1")
    torch.set_num_threads(args.threads)
    from ghnq.data import load_eval_images
    from ghnq.meta_train import heldout_specs
    from ghnq.rank import Data, predicted_accuracy
    from ghnq.sampler import spec_hash
    from ghnq.spec import build_model, load_spec, spec_name
    from ghnq.weights import ghnq_checkpoint

    specs = [load_spec(a) for a in args.arch] + heldout_specs(args.specs)
    if len(specs) < 3:
        raise UserError("need at least 3 specs for a rank correlation")
    test, labels, tsrc = load_eval_images(args.images, args.data_root, split="test", quiet=True)
    calib, _, csrc = load_eval_images(args.calib_images, args.data_root, split="train", quiet=True)
    data = Data(calib, test, labels, csrc, tsrc)
    ckpt = ghnq_checkpoint()
    out = Path(args.out)
    rows = []
    for spec in tqdm(specs, desc="rank trust", unit="spec"):
        folder = out / spec_hash(spec)[:16]
        cached = folder / "result.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        acc, _, _, weights = predicted_accuracy(build_model(spec), (8,), data)
        trained, fl, secs = trained_int8_top1(spec, folder, args, data)
        row = {"name": spec_name(spec), "predicted_int8": acc["8"], "trained_int8": trained, "trained_float": fl,
               "train_seconds": secs, "weights": weights}
        atomic_write_text(cached, json.dumps(row) + "\n")
        rows.append(row)
    x = np.array([r["predicted_int8"] for r in rows])
    y = np.array([r["trained_int8"] for r in rows])
    res = {"n": len(rows), "kendall_tau_b": kendall_tau_b(x, y), "kendall_p": permutation_p(kendall_tau_b, x, y),
           "spearman_rho": spearman_rho(x, y), "spearman_p": permutation_p(spearman_rho, x, y),
           "epochs": args.epochs, "train_images": args.train_images or "all", "test_images": len(labels),
           "test_source": tsrc, "ghnq_checkpoint": str(ckpt) if ckpt else None, "device": args.device, "rows": rows}
    atomic_write_text(out / "trust.json", json.dumps(res, indent=1) + "\n")
    title = (f"{len(rows)} specs: Kendall τ-b {res['kendall_tau_b']:.3f} (p {res['kendall_p']:.3f}), "
             f"Spearman ρ {res['spearman_rho']:.3f} (p {res['spearman_p']:.3f})")
    plot(rows, out / "trust.png", title)
    lines = [f"# Ranking trust: {title}", "", f"- trained: ghnq.train, {args.epochs} epochs on "
             f"{args.train_images or 'all'} training images, PTQ W8A8; test: {len(labels)} images ({tsrc})",
             f"- predicted: {rows[0]['weights']}", "", "| spec | predicted int8 % | trained int8 % | trained float % |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {100 * r['predicted_int8']:.2f} | {100 * r['trained_int8']:.2f} | "
              f"{100 * r['trained_float']:.2f} |" for r in rows]
    atomic_write_text(out / "trust.md", "\n".join(lines) + "\n\n![scatter](trust.png)\n")
    print(title)
    return 0


if __name__ == "__main__":
    run_cli(main)
