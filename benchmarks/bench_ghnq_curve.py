"""Training curve of a GHN-Q meta-training run: held-out top-1 (float / W8A8 / W4A8) vs steps and vs wall time
(the run's own step time, evaluations excluded), and train loss vs steps.

    .venv/bin/python benchmarks/bench_ghnq_curve.py runs/ghnq-main [runs/ghnq-noq] -o benchmarks/ghnq_curve.png

Reads RUN/log.jsonl, or RUN itself when it is a .jsonl file (the last record of a step wins: a resumed run
repeats the steps after its last checkpoint). Prints the evaluation points as JSON lines and writes the PNG.

`--keep DIR` also writes each run's log, condensed to what the plot uses, to DIR/<run>.jsonl. Run logs live in
git-ignored `runs/` and are lost with a fresh checkout; the condensed copies (≈ 100 kB per 2,000 steps) are
committed under benchmarks/results/ghnq-runs/ so every curve can be redrawn later.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from ghnq.fileio import atomic_write_text  # noqa: E402

STEP_FIELDS = ("step", "loss", "elapsed")  # all a step record contributes to the plot


def run_name(run: Path) -> str:
    return run.stem if run.suffix == ".jsonl" else run.name


def read_log(run: Path) -> tuple[dict[int, dict], dict[str, dict[int, dict]]]:
    """The run's step records by step, and its evaluation records by held-out space, then step (a line without
    `eval_space` predates --eval-space: it was the cifar set)."""
    log = run if run.suffix == ".jsonl" else run / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"error: {log}: no such run log (give a run directory holding log.jsonl, or a .jsonl file)")
    steps: dict[int, dict] = {}
    evals: dict[str, dict[int, dict]] = {}
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # torn last line of a killed run
        if "step" not in rec:
            continue  # the end-of-run DDP sync record
        if "eval" in rec:
            evals.setdefault(rec.get("eval_space", "cifar"), {})[rec["step"]] = rec
        else:
            steps[rec["step"]] = rec
    return steps, evals


def condensed(steps: dict[int, dict], evals: dict[str, dict[int, dict]]) -> str:
    """The log as JSON lines with only what this script reads: step records cut to STEP_FIELDS, eval records
    whole, in step order."""
    recs = [{k: steps[s][k] for k in STEP_FIELDS} for s in sorted(steps)]
    recs += [e for by_step in evals.values() for e in by_step.values()]
    recs.sort(key=lambda r: (r["step"], "eval" in r))
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--out", default="benchmarks/ghnq_curve.png")
    ap.add_argument("--keep", metavar="DIR", help="also write each run's condensed log to DIR/<run>.jsonl")
    args = ap.parse_args()
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    for i, run in enumerate(map(Path, args.runs)):
        color = f"C{i % 10}"  # one color per run, one line style per bit width
        steps, evals = read_log(run)
        if args.keep:
            kept = atomic_write_text(Path(args.keep) / f"{run_name(run)}.jsonl", condensed(steps, evals))
            print(f"# kept {kept}")
        xs = sorted(steps)
        window = 20
        losses = [steps[s]["loss"] for s in xs]
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax2.plot(xs, smooth, color=color, label=f"{run_name(run)} (mean of {window})")
        for space, by_step in sorted(evals.items()):
            es = sorted(by_step)
            name = run_name(run) if space == "cifar" else f"{run_name(run)} [{space} held-out]"
            alpha = 1.0 if space == "cifar" else 0.5  # the lineage's own curve (cifar) stands out
            for key, style in (("float", "-o"), ("8", "--s"), ("4", ":^")):
                label = f"{name} {'float' if key == 'float' else 'W' + key + 'A8'}"
                top1 = [100 * by_step[s]["eval"][key] for s in es]
                ax1.plot(es, top1, style, color=color, label=label, alpha=alpha)
                ax3.plot([by_step[s]["elapsed"] / 3600 for s in es], top1, style, color=color, label=label,
                         alpha=alpha)
            for s in es:
                e = by_step[s]
                print(json.dumps({"run": run_name(run), "space": space, "step": s,
                                  "hours": round(e["elapsed"] / 3600, 2), "nets": e["eval_nets"],
                                  "images": e["eval_images"],
                                  **{k: round(v, 4) for k, v in e["eval"].items()}}))
    ax1.axhline(10, color="gray", lw=0.8, ls="--")  # chance
    ax1.set_ylim(0, max(30.0, ax1.get_ylim()[1]))
    ax1.set_xlabel("meta-training step")
    ax1.set_ylabel("held-out mean top-1 (%)")
    ax1.set_title("GHN-Q held-out nets, CIFAR-10 test subset")
    # "best" finds no free spot once many runs are plotted; held-out accuracy sits above chance (10 %), so the
    # band near 0 stays clear.
    ax1.legend(fontsize=6, loc="lower right", ncol=3)
    ax3.axhline(10, color="gray", lw=0.8, ls="--")
    ax3.set_ylim(ax1.get_ylim())
    ax3.set_xlabel("meta-training wall time, hours (step time on the run's hardware)")
    ax3.set_ylabel("held-out mean top-1 (%)")
    ax3.set_title("the same vs wall time")
    ax2.set_xlabel("meta-training step")
    ax2.set_ylabel("train cross-entropy")
    ax2.set_title("meta-training loss")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
