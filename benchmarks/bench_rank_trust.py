"""Is GHN-Q's ranking worth trusting? Rank correlation of predicted int8 top-1 with SGD-trained int8 top-1.

    # phase (a), the long pole: SGD-train every spec for 1 epoch, quantize, measure (resumable, nohup-safe)
    nohup taskset -c 1 python -m benchmarks.bench_rank_trust --train --threads 1 > runs/rank-trust.log 2>&1 &
    # phase (b), ~35 s CPU per spec: GHN-Q's prediction for the specs (a) has finished, then τ/ρ, table, scatter
    python -m benchmarks.bench_rank_trust --ghn ghnq/assets/ghnq.pt --threads 1 --png benchmarks/rank_trust.png
    # report only, over whatever is cached
    python -m benchmarks.bench_rank_trust

Specs: the first --specs held-out sampled specs (ghnq.meta_train.heldout_specs: GHN-Q never trains on them).
Images, the same for both phases: test = the first --images of ghnq.data.interleaved_order over the 10,000
CIFAR-10 test images (class-balanced); calibration = the first --calib-images of the same order over the
training images (ghnq.evaluate.calibration_uint8).
  (a) trained   ghnq.train with its default recipe for --epochs (default 1) on all 50,000 training images,
                then calibration.calibrate (minmax observer, the trained BN statistics) and calibration.simulate:
                top-1 float / W8A8 / W4A8 / W4A4 (4-bit activations exist in the sim only). This is also GHN-Q's
                "SGD-trained for 1 epoch" yardstick (issue 5).
  (b) predicted ghnq.evaluate's protocol: GHN-Q parameters for each bit width, BN statistics re-estimated on the
                calibration images, calibrate + simulate: top-1 float / W8A8 / W4A8.
Then Kendall τ-b and Spearman ρ between predicted W8A8 and trained W8A8 over the specs both phases have (the
report says how many), plus the same for two trivial proxies (MACs, parameter count), trust.json, trust.md
and a scatter PNG.

Resumable: OUT/trained.json and OUT/predicted-<checkpoint sha256[:12]>.json hold one row per spec hash with the
settings that produced it, rewritten atomically after every spec; a rerun skips rows whose settings match.
An interrupted training continues from its checkpoint (ghnq.train --resume in OUT/train/<hash>/).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_write, atomic_write_text, sha256_file

ROOT = Path(__file__).resolve().parents[1]
TRAINED_BITS = (("float", None, None), ("8", 8, 8), ("4", 4, 8), ("4a4", 4, 4))
ALL_TRAINED_BITS = "float,8,4,4a4"

# ----------------------------------------------------------------------------------------------------
# Rank correlation: scipy when installed (it is not in the pinned stack), else the numpy versions below


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


def spearman_rho_np(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den else float("nan")


def kendall_tau_b_np(x: np.ndarray, y: np.ndarray) -> float:
    """τ-b = (concordant − discordant) / sqrt((n0 − ties_x)(n0 − ties_y)) over all pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    iu = np.triu_indices(len(x), 1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    den = float(np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy)))
    return float((sx * sy).sum() / den) if den else float("nan")


def permutation_p(stat: Callable[[np.ndarray, np.ndarray], float], x: np.ndarray, y: np.ndarray,
                  n: int = 5000, seed: int = 0) -> float:
    """Two-sided p-value: how often a random pairing of x with y gives |stat| at least as large."""
    observed = abs(stat(x, y))
    if np.isnan(observed):  # a constant column: no ranking to test
        return float("nan")
    rng = np.random.default_rng(seed)
    hits = sum(abs(stat(x, rng.permutation(y))) >= observed - 1e-12 for _ in range(n))
    return (hits + 1) / (n + 1)


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """{"kendall_tau_b", "kendall_p", "spearman_rho", "spearman_p", "n", "by"} of two columns."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) != len(y):
        raise ValueError(f"columns differ in length: {len(x)} vs {len(y)}")
    out: dict[str, Any] = {"n": len(x)}
    if len(x) < 3:
        return out | {"kendall_tau_b": float("nan"), "kendall_p": float("nan"), "spearman_rho": float("nan"),
                      "spearman_p": float("nan"), "by": "too few specs"}
    try:
        from scipy import stats
    except ImportError:
        stats = None
    if stats is not None and np.ptp(x) > 0 and np.ptp(y) > 0:
        k = stats.kendalltau(x, y, variant="b")
        s = stats.spearmanr(x, y)
        return out | {"kendall_tau_b": float(k.statistic), "kendall_p": float(k.pvalue),
                      "spearman_rho": float(s.statistic), "spearman_p": float(s.pvalue), "by": "scipy.stats"}
    return out | {"kendall_tau_b": kendall_tau_b_np(x, y), "kendall_p": permutation_p(kendall_tau_b_np, x, y),
                  "spearman_rho": spearman_rho_np(x, y), "spearman_p": permutation_p(spearman_rho_np, x, y),
                  "by": "numpy (permutation p-values)"}


# ----------------------------------------------------------------------------------------------------
# The row caches: {"rows": {spec hash: row}}, each row with the settings that produced it


def load_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
        return dict(obj["rows"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a result cache of this benchmark ({type(err).__name__}); move it away") from None


def save_rows(path: Path, rows: dict[str, dict]) -> None:
    atomic_write_text(path, json.dumps({"rows": rows}, indent=1) + "\n")


@torch.no_grad()
def float_top1(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    from ghnq.train import evaluate

    return evaluate(model, images, labels)


def quantized_top1(model: torch.nn.Module, calib: np.ndarray, test: np.ndarray, labels: np.ndarray,
                   wbits: int, abits: int) -> float:
    """Post-training quantization of trained weights: minmax calibration, trained BN statistics kept."""
    from calibration import calibrate, simulate

    qm = calibrate(model, calib, method="minmax", weight_bits=wbits, act_bits=abits, bn_recalibrate=False,
                   progress=False)
    return float((simulate(qm, test).argmax(1) == labels).mean())


def sgd_train(spec: dict, folder: Path, settings: dict, threads: int, data_root: str | None) -> Path:
    """ghnq.train in this process (so a kill stops it too); resumes from its checkpoint. Returns weights.pt."""
    import yaml

    from ghnq.train import main as train_main

    spec_file = folder / "spec.yaml"
    atomic_write_text(spec_file, yaml.safe_dump(spec, sort_keys=False))
    argv = ["--arch", str(spec_file), "--epochs", str(settings["epochs"]), "--out", str(folder),
            "--seed", str(settings["seed"]), "--threads", str(threads), "--eval-images", "2000", "--device", "cpu"]
    if settings["train_images"]:
        argv += ["--train-images", str(settings["train_images"])]
    if data_root:
        argv += ["--data-root", data_root]
    if (folder / "checkpoint.pt").is_file():
        argv.append("--resume")
    rc = train_main(argv)
    if rc:
        raise UserError(f"ghnq.train exited {rc} for {spec_file}")
    return folder / "weights.pt"


def train_phase(specs: list[dict], out: Path, settings: dict, calib: np.ndarray, test: np.ndarray,
                labels: np.ndarray, train: Callable[[dict, Path], Path], log: Callable[[str], None] = print
                ) -> dict[str, dict]:
    """Phase (a): train → float + PTQ top-1 per spec; cache rows in OUT/trained.json (skip matching rows)."""
    from ghnq.sampler import spec_hash
    from ghnq.spec import build_model, spec_name, summarize
    from ghnq.train import load_weights

    path = out / "trained.json"
    rows = load_rows(path)
    for i, spec in enumerate(specs, 1):
        h = spec_hash(spec)[:16]
        if rows.get(h, {}).get("settings") == settings:
            log(f"[{i}/{len(specs)}] {h}: cached")
            continue
        folder = out / "train" / h
        stale = folder / "run-settings.json"
        if stale.is_file() and json.loads(stale.read_text()) != settings:  # another schedule: start over
            for f in ("checkpoint.pt", "weights.pt"):
                (folder / f).unlink(missing_ok=True)
        atomic_write_text(stale, json.dumps(settings))
        t0 = time.perf_counter()
        weights = train(spec, folder)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = build_model(spec)
        info = summarize(model, spec["input"])
        model = load_weights(model, weights).eval()
        top1 = {"float": round(float_top1(model, test, labels), 4)}
        for label, wb, ab in TRAINED_BITS[1:]:
            if label not in settings.get("bits", ALL_TRAINED_BITS).split(","):
                continue
            top1[label] = round(quantized_top1(model, calib, test, labels, wb, ab), 4)
        rows[h] = {"name": spec_name(spec), "hash": h, "macs": int(info["macs"]), "params": int(info["params"]),
                   "top1": top1, "train_seconds": round(train_s, 1),
                   "eval_seconds": round(time.perf_counter() - t1, 1), "settings": settings,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        save_rows(path, rows)  # after every spec: a killed run loses at most the spec in progress
        log(f"[{i}/{len(specs)}] {h}: trained {train_s:.0f} s, top-1 {top1}")
    return rows


def ghn_phase(specs: list[dict], out: Path, ckpt: Path, bits: str, calib: np.ndarray, test: np.ndarray,
              labels: np.ndarray, log: Callable[[str], None] = print) -> tuple[dict[str, dict], Path]:
    """Phase (b): ghnq.evaluate's prediction path per spec; rows cached per checkpoint (sha256) and spec hash."""
    from ghnq.evaluate import load_predicted, parse_bits, top1_module
    from ghnq.predict import load_checkpoint, predict_params
    from ghnq.sampler import spec_hash
    from ghnq.spec import build_model, spec_name

    sha = sha256_file(ckpt)
    settings = {"checkpoint_sha256": sha, "bits": bits, "images": len(labels), "calib_images": len(calib)}
    path = out / f"predicted-{sha[:12]}.json"
    rows = load_rows(path)
    todo = [s for s in specs if rows.get(spec_hash(s)[:16], {}).get("settings") != settings]
    ghn = load_checkpoint(ckpt) if todo else None
    for i, spec in enumerate(todo, 1):
        h = spec_hash(spec)[:16]
        t0 = time.perf_counter()
        model = build_model(spec)
        top1 = {}
        for label, wbits, abits in parse_bits(bits):
            params = predict_params(ghn, model, bits=str(wbits) if wbits else "float")
            load_predicted(model, params)
            top1[label] = round(top1_module(model, wbits, abits, calib, test, labels), 4)
        rows[h] = {"name": spec_name(spec), "hash": h, "top1": top1, "seconds": round(time.perf_counter() - t0, 1),
                   "checkpoint": str(ckpt), "settings": settings}
        save_rows(path, rows)
        log(f"[{i}/{len(todo)}] {h}: predicted top-1 {top1}")
    return rows, path


# ----------------------------------------------------------------------------------------------------
# Report


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    x = [100 * r["predicted"]["8"] for r in rows]
    y = [100 * r["trained"]["8"] for r in rows]
    ax.scatter(x, y, c="tab:blue", s=18)
    for r, a, b in zip(rows, x, y, strict=True):
        ax.annotate(r["hash"][:8], (a, b), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel("GHN-Q predicted W8A8 top-1, % (no training)")
    ax.set_ylabel("SGD 1 epoch + PTQ W8A8 top-1, %")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def report(specs: list[dict], trained: dict[str, dict], predicted: dict[str, dict] | None, pred_path: Path | None,
           out: Path, png: Path, settings: dict, test_source: str) -> dict:
    from ghnq.sampler import spec_hash

    order = [spec_hash(s)[:16] for s in specs]
    done = [trained[h] for h in order if h in trained]
    both = [{**trained[h], "trained": trained[h]["top1"], "predicted": predicted[h]["top1"]}
            for h in order if h in trained and predicted and h in predicted]
    res: dict[str, Any] = {"specs": len(specs), "trained_done": len(done), "paired": len(both),
                           "settings": settings, "test_source": test_source,
                           "predicted_file": str(pred_path) if pred_path else None,
                           "checkpoint_sha256": next(iter(predicted.values()))["settings"]["checkpoint_sha256"]
                           if predicted else None}
    if both:
        y = np.array([r["trained"]["8"] for r in both])
        res["predicted_vs_trained_w8a8"] = correlations(np.array([r["predicted"]["8"] for r in both]), y)
        if all("float" in r["predicted"] for r in both):
            res["predicted_vs_trained_float"] = correlations(np.array([r["predicted"]["float"] for r in both]),
                                                             np.array([r["trained"]["float"] for r in both]))
        res["macs_vs_trained_w8a8"] = correlations(np.array([r["macs"] for r in both]), y)
        res["params_vs_trained_w8a8"] = correlations(np.array([r["params"] for r in both]), y)
    if len(done) >= 3:  # the trained column alone: how much does 1-epoch PTQ reorder the float ranking?
        res["trained_float_vs_w8a8"] = correlations(np.array([r["top1"]["float"] for r in done]),
                                                    np.array([r["top1"]["8"] for r in done]))
    res["rows"] = [{**trained[h], "predicted": (predicted or {}).get(h, {}).get("top1")} for h in order
                   if h in trained]
    atomic_write_text(out / "trust.json", json.dumps(res, indent=1) + "\n")

    c = res.get("predicted_vs_trained_w8a8")
    if c:
        title = (f"{c['n']} of {len(specs)} held-out specs: Kendall τ-b {c['kendall_tau_b']:.3f} "
                 f"(p {c['kendall_p']:.3f}), Spearman ρ {c['spearman_rho']:.3f} (p {c['spearman_p']:.3f})")
        plot(both, png, title)
    else:
        title = f"{len(done)} of {len(specs)} specs trained; no GHN-Q predictions yet (run --ghn)"
    ptag = "GHN-Q pred." if predicted else ""
    lines = [f"# Ranking trust: {title}", "",
             f"- trained: ghnq.train, {settings['epochs']} epoch(s) on {settings['train_images'] or 50000} "
             f"training images, seed {settings['seed']}; PTQ minmax on {settings['calib_images']} calibration "
             f"images; test: {settings['images']} images ({test_source})",
             f"- predicted: {pred_path or 'none'}", "",
             "| spec | MMACs | params k | SGD float % | SGD W8A8 % | SGD W4A8 % | SGD W4A4 % | train s | "
             f"{ptag} float % | {ptag} W8A8 % | {ptag} W4A8 % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        t, p = r["top1"], r["predicted"] or {}
        lines.append(f"| {r['hash'][:12]} | {r['macs'] / 1e6:.1f} | {r['params'] / 1e3:.0f} | {_pct(t['float'])} | "
                     f"{_pct(t['8'])} | {_pct(t.get('4'))} | {_pct(t.get('4a4'))} | {r['train_seconds']:.0f} | "
                     f"{_pct(p.get('float'))} | {_pct(p.get('8'))} | {_pct(p.get('4'))} |")
    if done:
        lines += ["", "| mean over trained specs | | | " + " | ".join(
            _pct(float(np.mean([r["top1"][k] for r in done])) if all(k in r["top1"] for r in done) else None)
            for k in ("float", "8", "4", "4a4")) + " | | | | |"]
    lines.append("")
    for key in ("predicted_vs_trained_w8a8", "predicted_vs_trained_float", "macs_vs_trained_w8a8",
                "params_vs_trained_w8a8", "trained_float_vs_w8a8"):
        if key in res:
            c = res[key]
            lines.append(f"- {key}: n={c['n']}, Kendall τ-b {c['kendall_tau_b']:.3f} (p {c['kendall_p']:.3g}), "
                         f"Spearman ρ {c['spearman_rho']:.3f} (p {c['spearman_p']:.3g}) [{c['by']}]")
    atomic_write_text(out / "trust.md", "\n".join(lines) + "\n")
    print(title)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_rank_trust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="phase (a): SGD-train + quantize every spec not cached")
    p.add_argument("--ghn", nargs="?", const="ghnq/assets/ghnq.pt", default=None, metavar="CKPT",
                   help="phase (b): GHN-Q predictions with this checkpoint (default: the shipped ghnq/assets/ghnq.pt)")
    p.add_argument("--ghn-bits", default="float,8,4", help="phase (b) bit widths (ghnq.evaluate --bits syntax)")
    p.add_argument("--ghn-all", action="store_true",
                   help="phase (b) for every spec (default: only the specs phase (a) has finished, ~35 s CPU each)")
    p.add_argument("--specs", type=int, default=20, help="the first N held-out specs (default 20)")
    p.add_argument("--epochs", type=int, default=1, help="SGD epochs per spec (default 1)")
    p.add_argument("--train-images", type=int, default=0, help="train on the first N images only (default all)")
    p.add_argument("--trained-bits", default=ALL_TRAINED_BITS, help="phase (a) PTQ bit widths: float and 8 always, "
                   "4 and 4a4 optional (each 4-bit sim of --images costs as much as the W8A8 one)")
    p.add_argument("--images", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--out", default="runs/rank-trust", help="cache + report folder (default runs/rank-trust)")
    p.add_argument("--png", default=None, help="scatter PNG (default OUT/trust.png)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.specs < 1 or args.epochs < 1 or args.images < 1 or args.calib_images < 1 or args.train_images < 0:
        raise UserError("--specs, --epochs, --images, --calib-images must be >= 1 (--train-images >= 0)")
    if args.ghn is not None and not Path(args.ghn).is_file():
        raise UserError(f"--ghn: {args.ghn}: checkpoint file not found")
    torch.set_num_threads(args.threads)
    from ghnq.data import load_eval_images
    from ghnq.evaluate import calibration_uint8
    from ghnq.meta_train import heldout_specs

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S', time.gmtime())} {msg}", flush=True)

    specs = heldout_specs(args.specs)
    test, labels, tsrc = load_eval_images(args.images, args.data_root, split="test", quiet=True)
    if len(labels) < args.images:
        raise UserError(f"only {len(labels)} test images at {tsrc}; need {args.images} (CIFAR-10 data root)")
    calib = calibration_uint8(args.calib_images, args.data_root)
    out = Path(args.out)
    settings = {"epochs": args.epochs, "train_images": args.train_images, "seed": args.seed, "images": args.images,
                "calib_images": args.calib_images, "method": "minmax", "test_order": "interleaved_order[:images]"}
    tbits = [b.strip() for b in args.trained_bits.split(",") if b.strip()]
    allowed = ALL_TRAINED_BITS.split(",")
    if not {"float", "8"} <= set(tbits) or not set(tbits) <= set(allowed):
        raise UserError(f"--trained-bits {args.trained_bits!r}: must include float and 8; allowed: {allowed}")
    if set(tbits) != set(allowed):  # only then part of the settings: caches written before the flag stay valid
        settings["bits"] = ",".join(b for b in allowed if b in tbits)
    if args.train:
        trained = train_phase(specs, out, settings, calib, test, labels,
                              lambda s, f: sgd_train(s, f, settings, args.threads, args.data_root), log)
    else:
        trained = {h: r for h, r in load_rows(out / "trained.json").items() if r.get("settings") == settings}
    predicted = pred_path = None
    if args.ghn is not None:
        from ghnq.sampler import spec_hash

        # only what can be paired, unless asked: the simulation of 2,000 images dominates this phase's time
        todo = specs if args.ghn_all else [s for s in specs if spec_hash(s)[:16] in trained]
        log(f"phase (b): {len(todo)} of {len(specs)} specs with {args.ghn}")
        predicted, pred_path = ghn_phase(todo, out, Path(args.ghn), args.ghn_bits, calib, test, labels, log)
    else:  # report with the newest prediction cache, if any
        files = sorted(out.glob("predicted-*.json"), key=lambda f: f.stat().st_mtime)
        if files:
            pred_path = files[-1]
            predicted = load_rows(pred_path)
    report(specs, trained, predicted, pred_path, out, Path(args.png) if args.png else out / "trust.png", settings,
           tsrc)
    return 0


if __name__ == "__main__":
    run_cli(main)
