"""Quantization-aware architecture ranking: which spec to ship, before training any of them.

    python -m ghnq.rank specs/*.yaml                        # → out/rank/rank.md, rank.csv, rank.png, rank.json
    python -m ghnq.rank --sample 20 --bits 8,4              # 20 specs drawn from the sampler (seeded)
    python -m ghnq.rank specs/*.yaml --target ssh://pi@raspberrypi     # latency measured on a Raspberry Pi

Per spec, each step a call into the package that owns it:
  1. weights   ghnq.weights.obtain_weights: GHN-Q's prediction, conditioned on each bit width (no training)
  2. quantize  calibration.calibrate on --calib-images training images (BN statistics re-estimated first)
  3. accuracy  calibration.simulate on --images test images: the predicted top-1 at every --bits
  4. export    export.tflite.write_tflite: the 8-bit QuantizedModel → an integer-only int8 .tflite
  5. latency   devices.bundle + devices.run on --target (default: this machine's LiteRT): eval.py checks the
               .tflite against the sim on --verify-images images, then times single-image inference
Ranking: Pareto fronts on (predicted int8 top-1 ↑, median latency ↓). Front 1 holds the specs no other spec
beats on both (at least as accurate and as fast, strictly better in one); front 2 is front 1 of the rest, and
so on; within a front, the more accurate first.

Resumable: a spec's result lands in OUT/cache/<spec hash>/result.json (written last, atomically) with the
settings that produced it; a rerun with the same settings skips it, so a killed run loses at most the spec
in progress. A spec that fails (a bad file, an op the toolkit cannot quantize or export) is reported in the
table and on stderr, and every other spec is still ranked.
Exit: 0 every spec ranked; 1 some specs failed (reported); 2 bad flags, or no spec could be ranked.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ghnq.cli import UserError, run_cli
from ghnq.fileio import atomic_write, atomic_write_text, sha256_file

DEFAULT_OUT = Path("out/rank")
RESULT = "result.json"
BITS = (8, 6, 4, 2)


@dataclass(frozen=True)
class Settings:
    """Everything a cached result depends on (besides the spec): a change re-evaluates every spec."""

    bits: tuple[int, ...]
    images: int
    calib_images: int
    verify_images: int
    runs: int
    warmup: int
    threads: int
    target: str
    method: str
    weights: str  # which GHN-Q checkpoint (sha256), or "random"
    data: str


# ----------------------------------------------------------------------------------------------------
# Pareto fronts (objectives: accuracy up, latency down)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, latency) a dominates b: at least as accurate and as fast, strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_fronts(points: list[tuple[float, float]]) -> list[int]:
    """Front index (1 = non-dominated) of every (accuracy, latency) point; equal points share a front."""
    front = [0] * len(points)
    left = set(range(len(points)))
    k = 0
    while left:
        k += 1
        now = {i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)}
        for i in now:
            front[i] = k
        left -= now
    return front


def pareto_order(rows: list[dict]) -> list[dict]:
    """Ranked rows: by front, then accuracy (desc), then latency; each row gets "front" and "rank"."""
    fronts = pareto_fronts([(r["top1"]["8"], r["latency_ms"]) for r in rows])
    for r, f in zip(rows, fronts, strict=True):
        r["front"] = f
    ranked = sorted(rows, key=lambda r: (r["front"], -r["top1"]["8"], r["latency_ms"], r["name"]))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


# ----------------------------------------------------------------------------------------------------
# One spec


@dataclass
class Data:
    calib: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    calib_source: str
    test_source: str


def top1(codes: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(codes, axis=1) == labels).mean())


def predicted_accuracy(model: torch.nn.Module, bits: tuple[int, ...], data: Data, method: str = "minmax",
                       step: Any = lambda name: None) -> tuple[dict[str, float], Any, np.ndarray, str]:
    """GHN-Q weights → calibrate → sim top-1 per bit width: ({bits: top-1}, 8-bit QM, its test codes, weights)."""
    from calibration import calibrate, simulate
    from ghnq.weights import obtain_weights

    name = getattr(model, "spec", {}).get("name", "model")
    acc: dict[str, float] = {}
    qm8 = codes8 = None
    weights8 = ""
    for b in bits:
        step(f"{name}: predict + quantize w{b}")
        # GHN-Q conditions its prediction on the bit width; predicted BN statistics are fresh, so re-estimate
        weights = obtain_weights(model, bits=b, quiet=True)
        qm = calibrate(model, data.calib, method=method, weight_bits=b, act_bits=8, bn_recalibrate=True,
                       progress=False, meta={"name": name, "weights": weights, "calibration_source": data.calib_source})
        step(f"{name}: sim w{b}")
        codes = simulate(qm, data.test)
        acc[str(b)] = top1(codes, data.labels)
        if b == 8:
            qm8, codes8, weights8 = qm, codes, weights
    if qm8 is None or codes8 is None:
        raise ValueError("bits must include 8")
    return acc, qm8, codes8, weights8


def evaluate_spec(spec: dict, s: Settings, data: Data, target: Any, folder: Path,
                  step: Any = lambda name: None, quiet: bool = False) -> dict:
    """Weights → quantize → sim accuracy at every bit width → int8 .tflite → device check + latency."""
    from calibration.qmodel import input_codes, save
    from devices.bundle import VERIFY_FILES, make_bundle
    from devices.run import run_bundle
    from export.tflite import write_tflite
    from ghnq.data import fit_images
    from ghnq.sampler import spec_hash
    from ghnq.spec import build_model, spec_name, summarize

    t0 = time.perf_counter()
    name = spec_name(spec)
    # the images at the spec's declared input size (the caller names the spec in any error)
    data = replace(data, calib=fit_images(data.calib, spec["input"], "input"),
                   test=fit_images(data.test, spec["input"], "input"))
    model = build_model(spec)
    info = summarize(model, spec["input"])
    acc, qm8, codes8, weights = predicted_accuracy(model, s.bits, data, s.method, step)
    row: dict[str, Any] = {"name": name, "hash": spec_hash(spec)[:16], "macs": info["macs"],
                           "params": info["params"], "top1": acc, "weights": weights}

    step(f"{name}: export int8 .tflite")
    artifact = write_tflite(qm8, folder / f"{name}_int8.tflite")
    save(qm8, folder / f"{name}_w8.qm")
    # The bundle contract (devices/bundle.py): the eval inputs, the sim's expected codes, the labels.
    k = min(s.verify_images, len(data.test))
    for key, arr in (("inputs", input_codes(data.test[:k])), ("expected", codes8[:k].astype(np.int8)),
                     ("labels", data.labels[:k].astype(np.int64))):
        atomic_write(folder / "verify" / VERIFY_FILES[key], lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
    bundle = make_bundle(folder)

    step(f"{name}: latency on {target.name}")
    eval_args = ["--artifact", artifact.name, "--threads", str(s.threads), "--runs", str(s.runs),
                 "--warmup", str(s.warmup), *(["--quiet"] if quiet else [])]
    rc, result, _ = run_bundle(target, bundle, eval_args, folder / "runs" / target.name)
    if result is None:
        raise UserError(f"{target.name}: eval.py refused the bundle {bundle} (exit {rc}; see its message above)")
    rec = result["artifacts"][artifact.name]
    lat = rec["latency_ms"]
    row.update({"latency_ms": lat["median"], "latency_p90_ms": lat["p90"], "verified": bool(result["verified"]),
                "device_top1_agreement": rec["top1_agreement"], "device_max_step_error": rec["max_step_error"],
                "device_top1": rec["accuracy"], "verify_images": k, "runtime": rec["runtime"],
                "target": target.name, "device": result.get("device", {}).get("machine"),
                "artifact": str(artifact), "artifact_bytes": artifact.stat().st_size,
                "seconds": round(time.perf_counter() - t0, 1)})
    return row


# ----------------------------------------------------------------------------------------------------
# Outputs: table (markdown + CSV), plot, JSON


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def table_rows(ranked: list[dict], bits: tuple[int, ...]) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "front", "spec", *[f"top1_w{b}_%" for b in bits], "latency_ms", "latency_p90_ms", "MMACs",
            "params_k", "verified", "agreement_%", "max_step_error", "weights"]
    body = []
    for r in ranked:
        body.append([str(r["rank"]), str(r["front"]), r["name"], *[_pct(r["top1"].get(str(b))) for b in bits],
                     f"{r['latency_ms']:.3f}", f"{r['latency_p90_ms']:.3f}", f"{r['macs'] / 1e6:.2f}",
                     f"{r['params'] / 1e3:.1f}", "yes" if r["verified"] else "NO",
                     _pct(r["device_top1_agreement"]), str(r["device_max_step_error"]), r.get("weights", "")])
    return head, body


def table_markdown(ranked: list[dict], bits: tuple[int, ...]) -> list[str]:
    head, body = table_rows(ranked, bits)
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def markdown(ranked: list[dict], failed: list[dict], s: Settings, data: Data) -> str:
    lines = ["# Architecture ranking (predicted, before any training)", "",
             f"- accuracy: fake-quant sim top-1 on {len(data.labels)} test images ({data.test_source}); weights: "
             f"GHN-Q prediction per bit width; calibration on {len(data.calib)} training images ({data.calib_source})",
             f"- latency: int8 .tflite, median of {s.runs} single-image runs after {s.warmup} warm-up, "
             f"{s.threads} thread(s), target `{s.target}`" + (f" ({ranked[0]['runtime']}, {ranked[0]['device']})"
                                                              if ranked else ""),
             f"- verified: the .tflite on the target agrees with the sim on {s.verify_images} images "
             "(devices.run tolerance)",
             "- front: Pareto front on (int8 top-1 ↑, latency ↓); 1 = no other spec is both as accurate and as fast",
             "", *table_markdown(ranked, s.bits)]
    if failed:
        lines += ["", f"## Not ranked ({len(failed)})", "", "| spec | error |", "|---|---|"]
        lines += [f"| {f['spec']} | {f['error'].replace('|', '/')} |" for f in failed]
    lines += ["", "![accuracy vs latency](rank.png)"]
    return "\n".join(lines) + "\n"


def csv_text(ranked: list[dict], s: Settings) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head, body = table_rows(ranked, s.bits)
    w.writerow(head)
    w.writerows(body)
    return buf.getvalue()


def plot(ranked: list[dict], path: Path, s: Settings) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    lat = np.array([r["latency_ms"] for r in ranked])
    acc = np.array([100 * r["top1"]["8"] for r in ranked])
    on = np.array([r["front"] == 1 for r in ranked], dtype=bool)
    ax.scatter(lat[~on], acc[~on], c="tab:gray", label="dominated")
    ax.scatter(lat[on], acc[on], c="tab:red", zorder=3, label="Pareto front")
    if on.any():  # the front as a staircase: every point below/right of it is dominated
        order = np.argsort(lat[on])
        ax.step(lat[on][order], acc[on][order], where="post", c="tab:red", lw=1.2, zorder=2)
    for i, (r, x, y) in enumerate(zip(ranked, lat, acc, strict=True)):
        # staggered offsets keep labels of near-equal points apart
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4 - 9 * (i % 3)), fontsize=7)
    if lat.min() > 0 and lat.max() / lat.min() > 20:
        ax.set_xscale("log")  # latencies spanning orders of magnitude
    ax.set_xlabel(f"int8 .tflite latency per image, ms (median; {s.target}, {s.threads} thread(s))")
    ax.set_ylabel("predicted int8 top-1, %")
    src = "random init: no GHN-Q checkpoint" if s.weights == "random" else "GHN-Q weights"
    ax.set_title(f"{len(ranked)} specs: predicted int8 accuracy ({src}, fake-quant sim) vs latency", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The command


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        bits = [-1]
    if not bits or any(b not in BITS for b in bits):
        raise UserError(f"--bits {text!r}: expected a comma list of weight bit widths from {', '.join(map(str, BITS))}")
    return (8, *dict.fromkeys(b for b in bits if b != 8))  # 8 always: the exported artifact is int8


def collect_specs(paths: list[str], sample: int, seed: int) -> list[tuple[str, dict | None, str | None]]:
    """(label, spec or None, error) for every spec file, then every sampled spec."""
    from ghnq.sampler import sample_spec
    from ghnq.spec import load_spec

    out: list[tuple[str, dict | None, str | None]] = []
    for p in paths:
        try:
            out.append((p, load_spec(p), None))
        except UserError as err:
            out.append((p, None, str(err)))
    rng = random.Random(seed)
    for _ in range(sample):
        spec = sample_spec(rng)
        out.append((spec["name"], spec, None))
    return out


def _checkpoint_id() -> str:
    from ghnq.weights import ghnq_checkpoint

    ckpt = ghnq_checkpoint()
    return "random" if ckpt is None else f"{ckpt.name}:{sha256_file(ckpt)[:16]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ghnq.rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", metavar="SPEC", help="spec.yaml files to rank")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="also rank N specs drawn from the sampler")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--bits", default="8,4", help="weight bit widths whose predicted top-1 is reported (default 8,4; "
                   "8 is always included)")
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--images", type=int, default=1000, metavar="N", help="test images for the sim accuracy (1000)")
    p.add_argument("--calib-images", type=int, default=512, metavar="N", help="training images for calibration (512)")
    p.add_argument("--verify-images", type=int, default=100, metavar="N",
                   help="of the test images, how many the target checks against the sim (100)")
    p.add_argument("--runs", type=int, default=50, help="timed latency runs per spec (50)")
    p.add_argument("--warmup", type=int, default=10, help="latency warm-up runs per spec (10)")
    p.add_argument("--method", default="minmax", help="activation observer (minmax, percentile, mse, ...)")
    p.add_argument("--data-root", metavar="DIR", help="CIFAR-10 JPEG root (default: $GHNQ_DATA_ROOT or "
                   "../shared/data/cifar10-jpeg; else the embedded 512-image sample)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from devices.run import add_target_args, target_from_args

    add_target_args(p)
    p.add_argument("--threads", type=int, default=1, help="runtime threads for latency, and torch threads (1)")
    args = p.parse_args(argv)

    from calibration.observers import METHODS

    bits = parse_bits(args.bits)
    if args.method not in METHODS:
        raise UserError(f"--method {args.method!r}; allowed: {', '.join(METHODS)}")
    for flag in ("sample", "images", "calib_images", "verify_images", "runs", "threads"):
        v = getattr(args, flag)
        if v < (0 if flag == "sample" else 1):
            raise UserError(f"--{flag.replace('_', '-')} {v}: must be ≥ {0 if flag == 'sample' else 1}")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must be ≥ 0")
    if not args.specs and not args.sample:
        raise UserError("nothing to rank: give SPEC files and/or --sample N")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UserError(f"--data-root {args.data_root}: no such folder")
    torch.set_num_threads(args.threads)
    target = target_from_args(args)  # a bad --target fails here, before any work

    from ghnq.data import load_eval_images

    test, labels, test_source = load_eval_images(args.images, args.data_root, split="test", quiet=True)
    calib, _, calib_source = load_eval_images(args.calib_images, args.data_root, split="train", quiet=True)
    data = Data(calib, test, labels, calib_source, test_source)
    s = Settings(bits=bits, images=len(test), calib_images=len(calib), verify_images=args.verify_images,
                 runs=args.runs, warmup=args.warmup, threads=args.threads, target=target.name, method=args.method,
                 weights=_checkpoint_id(), data=f"{test_source} | {calib_source}")
    if s.weights == "random":
        print("WARNING: no GHN-Q checkpoint in this build (ghnq/assets/ghnq.pt): every spec gets a seeded random "
              "init, so accuracies sit near chance and the ranking says nothing about accuracy", file=sys.stderr)

    out = Path(args.out)
    todo = collect_specs(args.specs, args.sample, args.seed)
    from ghnq.sampler import spec_hash

    rows: list[dict] = []
    failed: list[dict] = []
    seen: set[str] = set()
    bar = tqdm(todo, desc="rank", unit="spec", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    for label, spec, error in bar:
        if spec is None:
            failed.append({"spec": label, "error": error})
            tqdm.write(f"{label}: not ranked: {error}", file=sys.stderr)
            continue
        h = spec_hash(spec)
        if h in seen:
            tqdm.write(f"{label}: same architecture as an earlier spec; ranked once", file=sys.stderr)
            continue
        seen.add(h)
        folder = out / "cache" / h[:16]
        cached = _load_cached(folder / RESULT, s)
        if cached is not None:
            cached["from_cache"] = True
            rows.append(cached)
            bar.set_postfix_str(f"{cached['name']}: cached")
            continue
        try:
            row = evaluate_spec(spec, s, data, target, folder, step=bar.set_postfix_str, quiet=args.quiet)
        except Exception as err:  # one bad spec must not stop the ranking of the others
            msg = str(err).splitlines()[0] if str(err) else ""
            what = msg if isinstance(err, UserError) else f"{type(err).__name__}: {msg}"
            failed.append({"spec": label, "error": what})
            tqdm.write(f"{label}: not ranked: {what}", file=sys.stderr)
            continue
        row["spec"] = label
        atomic_write_text(folder / RESULT, json.dumps({"settings": asdict(s), "row": row}, indent=1) + "\n")
        row["from_cache"] = False
        rows.append(row)
    bar.close()

    if not rows:
        raise UserError(f"no spec could be ranked ({len(failed)} failed; see the messages above)")
    ranked = pareto_order(rows)
    atomic_write_text(out / "rank.md", markdown(ranked, failed, s, data))
    atomic_write_text(out / "rank.csv", csv_text(ranked, s))
    plot(ranked, out / "rank.png", s)
    atomic_write_text(out / "rank.json", json.dumps({"settings": asdict(s), "ranked": ranked, "failed": failed},
                                                    indent=1) + "\n")
    print("\n".join(table_markdown(ranked, s.bits)))
    print(f"\n{len(ranked)} ranked ({sum(r['from_cache'] for r in ranked)} from cache), {len(failed)} failed: "
          f"{out / 'rank.md'}, rank.csv, rank.png, rank.json")
    return 1 if failed else 0


def _load_cached(path: Path, s: Settings) -> dict | None:
    """The cached row when it was made with these settings (JSON turns tuples into lists: compare as JSON)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if json.dumps(obj.get("settings"), sort_keys=True) != json.dumps(asdict(s), sort_keys=True):
        return None
    return obj.get("row")


if __name__ == "__main__":
    run_cli(main)
